"""timm's model module for nfnet-zoo: `timm.list_modules()` shows it as `nfnet_zoo`.

timm files each registered model under the last component of its entrypoint's `__module__` and
appends the model's name to that module's `__all__`, and reads their pretrained configs from its
`default_cfgs`; `variants.py` puts its entrypoints and configs here,
so that `timm.list_models(module="nfnet_zoo")` lists this package's models and nothing else's
`__all__` grows.
"""
__all__: list[str] = []  # filled by timm's register_model
