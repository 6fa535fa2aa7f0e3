"""Publishing to the Hugging Face Hub: push a run folder, publish a converted DeepMind checkpoint.

Everything goes through huggingface_hub's `HfApi` (create_repo, create_branch, list_repo_tree,
create_commit); this module decides what to upload and when not to:
- only model.safetensors, config.json, README.md and curves.png (when the run has it) ever leave the
  machine (no state, no pickles);
- before committing it compares local hashes with the Hub's tree listing (sha256 for LFS files,
  git blob ids for the others) and commits only what changed, so an unchanged folder makes no commit;
- huggingface_hub already retries preupload, LFS batch and LFS uploads with backoff, but not the
  commit (a lost answer could duplicate it). We retry the commit ourselves, re-reading the tree first
  so that a commit which did land is never made twice;
- every failure becomes one NFNetZooError line saying what to re-run; the token is never printed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union
from urllib.parse import urlsplit

from ..errors import NFNetZooError
from ..files import CARD, CONFIG, CURVES, WEIGHTS
from ..models.cards import build_checkpoint_card, build_model_card, build_zoo_card, write_model_card, write_zoo_cards, zoo_tags
from ..models.shared_config import exact_architecture, is_timm_own, shared_form

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 3
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass
class _File:
    path: str                     # path in the repo
    source: Union[Path, bytes]    # local file, or generated content
    note: str = ""
    size: int = field(init=False)
    _sha256: Optional[str] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.size = self.source.stat().st_size if isinstance(self.source, Path) else len(self.source)

    def _chunks(self) -> Iterator[bytes]:
        if isinstance(self.source, bytes):
            yield self.source
            return
        with self.source.open("rb") as f:
            while chunk := f.read(1 << 24):
                yield chunk

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            h = hashlib.sha256()
            for chunk in self._chunks():
                h.update(chunk)
            self._sha256 = h.hexdigest()
        return self._sha256

    @property
    def git_blob_id(self) -> str:
        h = hashlib.sha1(b"blob %d\0" % self.size)
        for chunk in self._chunks():
            h.update(chunk)
        return h.hexdigest()


@dataclass
class PushResult:
    """What a push did (or, with dry_run, would do)."""

    repo_id: str
    revision: str
    files: list[_File]
    skipped: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    commit: Optional[str] = None
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None
    dry_run: bool = False

    def __str__(self) -> str:
        where = f"{self.repo_id}@{self.revision}"
        if self.dry_run:
            lines = [f"dry run: would upload to {where} (nothing was sent):"]
            lines += [f"  {f.path:<18} {f.size:>12,d} bytes  {f.note}".rstrip() for f in self.files]
            if self.skipped:
                lines.append(f"  not uploaded: {', '.join(self.skipped)}")
            return "\n".join(lines)
        if not self.uploaded:
            return f"{where} is up to date (commit {self.commit}): nothing to push"
        target = f"pull request {self.pr_url}" if self.pr_url else where
        return f"pushed {', '.join(self.uploaded)} to {target}: commit {self.commit} ({self.commit_url})"


# --- what to upload ------------------------------------------------------------------------
def _weights_file(run: Path, repo_id: str, dataset_id: Optional[str]) -> _File:
    from safetensors import SafetensorError, safe_open

    path = run / WEIGHTS
    if not path.is_file():
        raise NFNetZooError(f"{run} has no model.safetensors: only safetensors weights are pushed; export the "
                            "model with timm.models.save_for_hf(model, DIR, safe_serialization=True)")
    try:
        with safe_open(str(path), "pt") as f:
            if not list(f.keys()):
                raise SafetensorError("no tensors")
    except (SafetensorError, OSError, ValueError) as e:
        raise NFNetZooError(f"{path} is not a readable safetensors file ({e}); re-export the model") from None
    return _File(WEIGHTS, path)


def _config_file(run: Path, repo_id: str, dataset_id: Optional[str]) -> _File:
    """config.json as it is when already in the shared form (or timm's own nfnet_fN, as plain timm wrote it),
    else converted (shared_config.py); first checked against the weights as nfnet-zoo's loader checks them, so
    that nothing goes up that `predict` would refuse."""
    import json

    from ..models.load import check_model_folder, weights_shapes

    path = run / CONFIG
    config, _, _ = check_model_folder(path, run / WEIGHTS, str(run), "restore the one finetune wrote")
    if is_timm_own(config, weights_shapes(run / WEIGHTS, "re-export the model")):
        return _File(CONFIG, path, "(timm's own nfnet_fN, as timm wrote it)")
    try:
        shared = shared_form(config)
    except (ValueError, KeyError, TypeError) as e:
        raise NFNetZooError(f"{path} is not a timm config.json ({str(e).splitlines()[0][:80] if str(e) else ''}); "
                            f"restore the one finetune wrote") from None
    if shared is config:
        return _File(CONFIG, path)
    return _File(CONFIG, (json.dumps(shared, indent=2) + "\n").encode(),
                 "(converted to the shared form: loads in timm and transformers)")


def _card_file(run: Path, repo_id: str, dataset_id: Optional[str]) -> _File:
    # the untouched draft; `nfnet-zoo curves` may have drawn curves.png after finetune wrote it
    drafts = {str(build_model_card(run, curves=shown)).encode() for shown in {(run / CURVES).is_file(), False}}
    readme = run / CARD
    if readme.is_file() and readme.read_bytes() not in drafts:
        return _File(CARD, readme, "(your edited model card)")
    # missing, or the untouched draft: fill in the repo id for the usage snippet
    return _File(CARD, str(build_model_card(run, repo_id, dataset_id=dataset_id)).encode(),
                 "(model card built from the run)")


def _curves_file(run: Path, repo_id: str, dataset_id: Optional[str]) -> Optional[_File]:
    """A PNG file when there is one (optional; a link is refused before this)."""
    path = run / CURVES
    if not (path.exists() or path.is_symlink()):
        return None
    with suppress(OSError):
        if path.is_file():
            with path.open("rb") as f:
                if f.read(8) == b"\x89PNG\r\n\x1a\n":
                    return _File(CURVES, path, "(training curves, shown by the card)")
    raise NFNetZooError(f"{path} is not a PNG file (a folder or another file) and is not pushed that way; "
                        f"redraw it with `nfnet-zoo curves {run}`, or remove it")


# What push publishes from a run folder, in order (the config is checked against the weights, the card
# names the curves): each file with how it is checked and prepared. Everything else in the folder stays.
PUBLISHED: dict[str, Callable[[Path, str, Optional[str]], Optional[_File]]] = {
    WEIGHTS: _weights_file, CONFIG: _config_file, CARD: _card_file, CURVES: _curves_file,
}


def _own_file(path: Path) -> None:
    """Refuse a link: a run folder travels between people, and a link in it could point at any file of yours
    (credentials as README.md ...). Checked before anything of it is read or sent."""
    if path.is_symlink():
        raise NFNetZooError(f"{path} is a link, and push uploads only a run folder's own files (a link could point "
                            f"at any file of yours); replace it with the file it stands for, or remove it")


def _run_files(run: Path, repo_id: str, dataset_id: Optional[str] = None) -> tuple[list[_File], list[str]]:
    if not run.is_dir():
        raise NFNetZooError(f"{run} is not a folder; pass a run folder written by `nfnet-zoo finetune`")
    for name in PUBLISHED:
        _own_file(run / name)
    files = [f for f in (prepare(run, repo_id, dataset_id) for prepare in PUBLISHED.values()) if f is not None]
    skipped = sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir() if p.name not in PUBLISHED)
    return files, skipped


# --- talking to the Hub ------------------------------------------------------------------------
def _api(token: Optional[str], endpoint: Optional[str]):
    from huggingface_hub import HfApi, get_token

    from .. import __version__

    if token is None and get_token() is None:
        raise NFNetZooError("no Hugging Face token found: run `hf auth login`, set HF_TOKEN, or pass --token")
    return HfApi(endpoint=endpoint, token=token, library_name="nfnet-zoo", library_version=__version__)


def _remote_state(api, repo_id: str, revision: str) -> tuple[str, dict]:
    """(head commit, {path: tree entry}) of a branch, read at one commit so the two agree."""
    from huggingface_hub.hf_api import RepoFile

    head = api.repo_info(repo_id, revision=revision).sha
    return head, {e.path: e for e in api.list_repo_tree(repo_id, revision=head) if isinstance(e, RepoFile)}


def _unchanged(local: _File, remote) -> bool:
    if remote is None or remote.size != local.size:
        return False
    return remote.lfs.sha256 == local.sha256 if remote.lfs else remote.blob_id == local.git_blob_id


def _transport_error() -> Union[type, tuple]:
    """The HTTP library's TransportError (connection failed or dropped), found through huggingface_hub's own
    error class: huggingface_hub 1.x is built on httpx, 2.x on httpx2, and neither is ours to import."""
    from huggingface_hub.errors import HfHubHTTPError

    for base in HfHubHTTPError.__mro__:
        error = getattr(sys.modules.get(base.__module__), "TransportError", None)
        if isinstance(error, type) and issubclass(error, Exception):
            return error
    return ()  # matches nothing


def _http_cause(e: BaseException):
    """The HTTP error (HfHubHTTPError or a transport error) behind `e`, if any."""
    from huggingface_hub.errors import HfHubHTTPError

    transport = _transport_error()
    while e is not None:
        if isinstance(e, (HfHubHTTPError, transport)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _failed_commit_is_transient(e: BaseException) -> bool:
    cause = _http_cause(e)
    if "/commit/" not in _request_url(cause):  # other endpoints were already retried by huggingface_hub
        return False
    return isinstance(cause, _transport_error()) or cause.response.status_code in _RETRY_STATUS


def _request_url(cause) -> str:
    response = getattr(cause, "response", None)
    try:
        request = response.request if response is not None else cause.request
        return str(request.url)
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for a request it never set
        return ""


def _commit(api, repo_id: str, files: list[_File], revision: str, create_pr: bool,
            commit_message: Optional[str]) -> PushResult:
    from huggingface_hub import CommitOperationAdd

    result, failure = PushResult(repo_id, revision, files), None
    for attempt in range(1, COMMIT_ATTEMPTS + 2):  # the extra round only looks whether the last try landed
        head, remote = _remote_state(api, repo_id, revision)
        changed = [f for f in files if not _unchanged(f, remote.get(f.path))]
        if not changed:  # up to date; after a failed attempt this means that commit did land
            result.commit = head
            if failure is not None:
                result.commit_url = f"{api.endpoint}/{repo_id}/commit/{head}"
            return result
        if attempt > COMMIT_ATTEMPTS:
            raise failure
        ops = []
        for f in changed:
            op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.source)
            op.upload_info.sha256 = bytes.fromhex(f.sha256)  # already hashed: spare huggingface_hub a second pass
            ops.append(op)
        names = result.uploaded = [f.path for f in changed]
        try:
            info = api.create_commit(repo_id, ops, commit_message=commit_message or f"Upload {', '.join(names)}",
                                     commit_description="Pushed with nfnet-zoo.", revision=revision,
                                     create_pr=create_pr, parent_commit=head)
        except Exception as e:  # noqa: BLE001 - filtered just below, re-raised otherwise
            # A pull request cannot be found again by re-reading the branch, so it is not retried.
            if create_pr or not _failed_commit_is_transient(e):
                raise
            failure = e
            if attempt < COMMIT_ATTEMPTS:
                wait = 2 ** (attempt - 1)
                logger.warning("the Hub did not confirm the commit (%s); checking the Hub and retrying in %d s "
                               "(attempt %d of %d)", _describe(e), wait, attempt + 1, COMMIT_ATTEMPTS)
                time.sleep(wait)
            continue
        result.commit, result.commit_url, result.pr_url = info.oid, info.commit_url, info.pr_url
        return result
    raise AssertionError("unreachable")


def _describe(e: BaseException) -> str:
    cause = _http_cause(e)
    if cause is None:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    response = getattr(cause, "response", None)
    if response is None:  # transport error: the connection failed or was dropped
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else 'connection lost'}"
    message = (getattr(cause, "server_message", None) or "").strip().splitlines()
    where = urlsplit(_request_url(cause)).path
    return f"HTTP {response.status_code} on {where}" + (f": {message[0]}" if message else "")


@contextmanager
def _hub_errors(repo_id: str, folder: str, rerun: str) -> Iterator[None]:
    """Turn huggingface_hub and network failures into one NFNetZooError line naming the fix."""
    from huggingface_hub.errors import (BadRequestError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        yield
    except NFNetZooError:
        raise
    except Exception as e:  # noqa: BLE001 - everything below becomes one line; unknown ones keep the cause
        cause = _http_cause(e)
        status = cause.response.status_code if isinstance(cause, HfHubHTTPError) else None
        if status == 401:
            msg = ("the Hub refused the token (HTTP 401): log in again with `hf auth login`, set HF_TOKEN or pass "
                   f"--token with a token that has write access, then re-run `{rerun}`")
        elif status == 403:
            msg = (f"no write access to {repo_id} (HTTP 403): push to a namespace your token can write to, or open a "
                   "pull request with --create-pr")
        elif isinstance(cause, RevisionNotFoundError):
            msg = f"{repo_id} has no revision like that ({_describe(e)}): pass a branch name with --revision"
        elif isinstance(cause, RepositoryNotFoundError):
            msg = f"{repo_id} was not found or is not accessible with this token ({_describe(e)}); check --repo-id"
        elif isinstance(cause, BadRequestError) and "validate-yaml" in _request_url(cause):
            msg = f"the Hub rejected the model card metadata ({_describe(e)}): fix {folder}/README.md and re-run"
        elif status == 412:
            msg = f"{repo_id} changed while pushing ({_describe(e)}): re-run `{rerun}`"
        elif cause is not None or isinstance(e, (OSError, RuntimeError, ValueError)):
            msg = (f"push failed: {_describe(e)}. {folder} is unchanged; re-run `{rerun}` (files already on the Hub "
                   "are not sent again)")
        else:
            raise
        raise NFNetZooError(msg) from None


def _rerun_command(command: str, source: str, repo_id: str, extra: tuple[str, ...] = (), **options) -> str:
    """The command line that repeats this push; never the token (the hint is printed)."""
    args = ["nfnet-zoo", command, source, "--repo-id", repo_id, *extra]
    for name in ("private", "revision", "create_pr", "commit_message", "endpoint"):
        value, flag = options.get(name), "--" + name.replace("_", "-")
        args += [] if not value else [flag] if value is True else [flag, str(value)]
    return shlex.join(args)


def _push_files(files: list[_File], skipped: list[str], repo_id: str, *, folder: str, rerun: str,
                private: bool, revision: Optional[str], create_pr: bool, commit_message: Optional[str],
                token: Optional[str], endpoint: Optional[str], dry_run: bool) -> PushResult:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("a namespace is required")
    except HFValidationError as e:
        raise NFNetZooError(f"--repo-id {repo_id!r} is not a valid NAMESPACE/NAME ({str(e).splitlines()[0]}); "
                            "pass e.g. your-name/nfnet-f0-pets") from None
    branch = revision or "main"
    if dry_run:
        return PushResult(repo_id, branch, files, skipped=skipped, dry_run=True)
    api = _api(token, endpoint)
    with _hub_errors(repo_id, folder, rerun):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main" and not branch.startswith("refs/"):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        result = _commit(api, repo_id, files, branch, create_pr, commit_message)
    result.skipped = skipped
    return result


# --- public API ----------------------------------------------------------------------------
def push_to_hub(run_dir: Union[str, os.PathLike], repo_id: str, *, private: bool = False,
                revision: Optional[str] = None, create_pr: bool = False, commit_message: Optional[str] = None,
                token: Optional[str] = None, endpoint: Optional[str] = None, dry_run: bool = False,
                dataset_id: Optional[str] = None) -> PushResult:
    """Upload a run folder's model.safetensors, config.json, model card and curves.png (if drawn) to `repo_id`.

    Creates the repo (and the `revision` branch) if needed and commits only the files that differ from
    the Hub's copy, so pushing an unchanged folder makes no commit. RUN/README.md is uploaded as it is
    if you edited it; the untouched draft (or a missing card) is rebuilt with `repo_id` in its usage
    snippet. The folder itself is never modified. `token` defaults to huggingface_hub's login or
    HF_TOKEN, `endpoint` to HF_ENDPOINT. With `dry_run`, lists what would be uploaded and sends nothing.
    config.json goes up in the shared form (shared_config.py: plain timm and transformers load it where timm
    can express the architecture). `dataset_id` names the Hub dataset the run trained on in the card's metadata
    (default: the one a run on `--data-dir hfds/NAME` recorded in RUN/data.json). No file that is a link is read
    or sent.
    """
    run = Path(run_dir)
    if dataset_id is None:
        dataset_id = _hub_dataset_of(run)
    if dataset_id is not None:
        _check_dataset_id(dataset_id)
    files, skipped = _run_files(run, repo_id, dataset_id)
    rerun = _rerun_command("push", str(run), repo_id, private=private, revision=revision, create_pr=create_pr,
                           commit_message=commit_message, endpoint=endpoint)
    return _push_files(files, skipped, repo_id, folder=str(run), rerun=rerun, private=private, revision=revision,
                       create_pr=create_pr, commit_message=commit_message, token=token, endpoint=endpoint,
                       dry_run=dry_run)


def _hub_dataset_of(run: Path) -> Optional[str]:
    """The Hub dataset NAME a run trained on (RUN/data.json's root hfds/NAME), else None."""
    import json
    from ..data.hfds import PREFIX, is_hub_id
    data = run / "data.json"
    try:
        root = None if data.is_symlink() else json.loads(data.read_text(encoding="utf-8")).get("root")
    except (OSError, ValueError, AttributeError):
        return None
    return root[len(PREFIX):] if is_hub_id(root) else None


def _check_dataset_id(dataset_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(dataset_id)
    except HFValidationError as e:
        raise NFNetZooError(f"--dataset {dataset_id!r} is not a Hub dataset id ({str(e).splitlines()[0]}); pass the "
                            "id as on huggingface.co/datasets (e.g. beans or NAMESPACE/NAME), or leave it out") from None


def _zoo_tag(config: dict) -> Optional[str]:
    """The released variant a converted config is (`nfnet_f1.dm_in1k`), or None for any other architecture."""
    arch, model_args = exact_architecture(config)
    tag = f"{arch}.dm_in1k"
    extra = set(model_args) - {"num_classes", "global_pool"}
    return tag if tag in zoo_tags() and config.get("num_classes") == 1000 and not extra else None


def publish_checkpoint(src: Union[str, os.PathLike], repo_id: str, *, activation: str = "gelu", alpha: float = 0.2,
                       private: bool = False, revision: Optional[str] = None, create_pr: bool = False,
                       commit_message: Optional[str] = None, token: Optional[str] = None,
                       endpoint: Optional[str] = None, dry_run: bool = False) -> PushResult:
    """Convert an official DeepMind checkpoint (F1_haiku.npz ...) and push it with its model card and config.

    A released variant (F0-F6, 1000 classes) gets its zoo card (`nfnet-zoo cards`), any other
    architecture a card describing the converted shapes; config.json is the converter's. Conversion
    happens in a temporary folder; nothing is written beside `src`.
    """
    import json

    from ..models.convert import convert_haiku_checkpoint

    src = Path(src)
    with tempfile.TemporaryDirectory(prefix="nfnet-zoo-publish-") as tmp:
        out = convert_haiku_checkpoint(src, tmp, activation=activation, alpha=alpha)
        config = json.loads((out / "config.json").read_text())
        tag = _zoo_tag(config)
        if tag:
            card, note = build_zoo_card(tag, repo_id), f"(zoo card of {tag})"
        else:
            card, note = build_checkpoint_card(config, repo_id, src.name), "(card of the converted checkpoint)"
        # The converted config.json describes these weights; for an official file it equals hub_configs/<tag>/.
        files = [_File("model.safetensors", out / "model.safetensors", f"(converted from {src.name})"),
                 _File("config.json", (out / "config.json").read_bytes(), "(as converted)"),
                 _File("README.md", str(card).encode(), note)]
        extra = (("--activation", activation) if activation != "gelu" else ()) + \
                (("--alpha", str(alpha)) if alpha != 0.2 else ())
        rerun = _rerun_command("publish", str(src), repo_id, extra, private=private, revision=revision,
                               create_pr=create_pr, commit_message=commit_message, endpoint=endpoint)
        return _push_files(files, [], repo_id, folder=str(src), rerun=rerun, private=private,
                           revision=revision, create_pr=create_pr, commit_message=commit_message, token=token,
                           endpoint=endpoint, dry_run=dry_run)


__all__ = ["push_to_hub", "publish_checkpoint", "PushResult", "write_model_card", "build_model_card",
           "write_zoo_cards"]
