"""Load one model every way its receivers do and print each loader's probabilities on IMAGES as JSON.

python tests/_loaders.py SOURCE IMAGES_JSON WITH_ZOO
SOURCE: hf-hub:NAMESPACE/NAME or a local model folder; WITH_ZOO: 1 to `import nfnet_zoo` first, 0 never to.
Loaders: timm.create_model with the card's preprocessing (resolve_model_data_config), transformers'
AutoModelForImageClassification and TimmWrapperForImageClassification (a non-strict load counts as a
failure) with AutoImageProcessor, transformers' pipeline, and with nfnet-zoo its own load_model. A loader
that fails gives {"error": "..."}. Used by tests/test_sharing.py and benchmarks/sharing_gap.py.
"""

import json, sys
source, images, with_zoo = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
# timm's name for the source, and transformers' (a Hub repo id or a local folder)
timm_name = source if source.startswith("hf-hub:") else "local-dir:" + source
repo = source[len("hf-hub:"):] if source.startswith("hf-hub:") else source
if with_zoo:
    import nfnet_zoo
import torch, timm
from PIL import Image

pils = [Image.open(p).convert("RGB") for p in images]
out = {}

def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}

def timm_hub():  # the card's recipe
    model = timm.create_model(timm_name, pretrained=True).eval()
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        return model(torch.stack([tf(p) for p in pils])).softmax(-1).tolist()

def transformers_auto(cls_name):
    import transformers
    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(repo, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"non-strict load: {bad}")
    proc = transformers.AutoImageProcessor.from_pretrained(repo)
    with torch.no_grad():
        return model.eval()(**proc(pils, return_tensors="pt")).logits.softmax(-1).tolist()

def pipeline():
    from transformers import pipeline as make
    pipe = make("image-classification", model=repo)
    index = {v: int(k) for k, v in pipe.model.config.id2label.items()}
    rows = []
    for preds in pipe(pils, top_k=len(index)):  # every class (top_k=None is 5 in some versions)
        row = [0.0] * len(index)
        for p in preds:
            row[index[p["label"]]] = p["score"]
        rows.append(row)
    return rows

attempt("timm", timm_hub)
attempt("AutoModelForImageClassification", lambda: transformers_auto("AutoModelForImageClassification"))
attempt("TimmWrapperForImageClassification", lambda: transformers_auto("TimmWrapperForImageClassification"))
attempt("pipeline", pipeline)
if with_zoo:
    def exact():
        model = nfnet_zoo.load_model(source)
        tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
        with torch.no_grad():
            return model(torch.stack([tf(p) for p in pils])).softmax(-1).tolist()
    attempt("nfnet_zoo.load_model", exact)
out["nfnet_zoo imported"] = "nfnet_zoo" in sys.modules
print(json.dumps(out))
