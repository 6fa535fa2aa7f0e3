"""Hugging Face Hub datasets by name, timm's `hfds/NAME[:CONFIG][@REVISION]`: the revision is resolved to its
commit, which data.json records, and the rows are read through `datasets` and its cache, so a resume reads the
same rows even after the Hub moved on, and HF_HUB_OFFLINE=1 reads what an earlier run cached.

Offline, `datasets.load_dataset` would take the newest cached build of a dataset whatever the revision asked for,
so a prepared revision is opened here by its commit with datasets' own Cache builder (also online: no request)."""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import NFNetZooError

PREFIX = "hfds/"  # timm's prefix for a Hub dataset (train.py --dataset hfds/NAME)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_NAME_PART = re.compile(r"[\w.\-]+")  # a config name, or a revision's parts (branch, tag, refs/pr/N, commit)
_FORM = "hfds/NAME or hfds/USER/NAME, optionally :CONFIG and @REVISION (hfds/beans, hfds/USER/NAME:CONFIG@main)"


def is_hub_id(data: object) -> bool:
    return isinstance(data, str) and data.startswith(PREFIX)


@dataclass(frozen=True)
class HubDataset:
    """A dataset id as the user gave it: NAME, CONFIG (None: the dataset's default) and REVISION (None: main)."""

    name: str
    config: Optional[str] = None
    revision: Optional[str] = None

    @property
    def root(self) -> str:
        return PREFIX + self.name


def parse_hub_id(text: str) -> HubDataset:
    """`hfds/NAME[:CONFIG][@REVISION]`, checked as the Hub checks names (one line naming what is wrong)."""
    rest = text[len(PREFIX):]
    rest, at, revision = rest.partition("@")
    name, colon, config = rest.partition(":")
    if not name:
        raise NFNetZooError(f"--data-dir {text!r} names no dataset; pass {_FORM}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise NFNetZooError(f"--data-dir {text!r}: {name!r} is not a Hub dataset name ({str(e).splitlines()[0]}); "
                            f"pass {_FORM}") from None
    for what, value, given in (("config", config, colon), ("revision", revision, at)):
        parts = value.split("/") if what == "revision" else [value]
        if given and not all(_NAME_PART.fullmatch(p) and p not in (".", "..") for p in parts):
            raise NFNetZooError(f"--data-dir {text!r}: {what} {value!r} is empty or has characters a {what} name "
                                f"cannot hold; pass {_FORM}")
    return HubDataset(name, config or None, revision or None)


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _not_cached(ds: HubDataset, what: str) -> NFNetZooError:
    return NFNetZooError(f"{ds.root} {what} is not in the Hugging Face cache and HF_HUB_OFFLINE=1; run once online "
                         f"(unset HF_HUB_OFFLINE) to download it, or point HF_HOME at the cache that holds it")


def resolve_revision(ds: HubDataset) -> str:
    """The commit of `ds.revision` (main when None): asked of the Hub, or offline read from the Hub cache's refs."""
    revision = ds.revision or "main"
    if _offline():
        if _COMMIT.fullmatch(revision):
            return revision
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
        ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ds.name, repo_type="dataset") / "refs" / revision
        try:
            return ref.read_text().strip()
        except OSError:
            raise _not_cached(ds, f"revision {revision}") from None
    from huggingface_hub.utils import httpx  # httpx, or httpx2 where huggingface_hub uses that
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        commit = HfApi().dataset_info(ds.name, revision=revision).sha  # one request, not retried: fails fast
        if commit != revision:  # the card's download records the revision's commit in the Hub cache, for offline
            try:
                hf_hub_download(ds.name, "README.md", repo_type="dataset", revision=revision)
            except EntryNotFoundError:  # no card: recorded all the same
                pass
        return commit
    except RevisionNotFoundError:
        raise NFNetZooError(f"{ds.root} has no revision {revision!r}; pass a branch, tag or commit of "
                            f"huggingface.co/datasets/{ds.name} (or leave @REVISION out for main)") from None
    except RepositoryNotFoundError:
        raise NFNetZooError(f"no Hub dataset {ds.name!r} (or it is private or gated: log in with `hf auth login`); "
                            f"check the name on huggingface.co/datasets") from None
    except (httpx.TransportError, OSError) as e:
        raise NFNetZooError(f"cannot reach the Hugging Face Hub for {ds.root} ({type(e).__name__}); check the "
                            f"network, or set HF_HUB_OFFLINE=1 to use the cached copy") from None
    except HfHubHTTPError as e:
        raise NFNetZooError(f"the Hub refused {ds.root} ({str(e).splitlines()[0][:120]})") from None


def _prepared(name: str, config: Optional[str], commit: str):
    """The splits datasets prepared for (`name`, `config`, `commit`) in its cache, as a DatasetDict; None if none."""
    from datasets import config as ds_config
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache
    namespace, _, short = name.rpartition("/")
    folder = "___".join(p for p in (namespace, camelcase_to_snakecase(short)) if p)
    found = sorted(glob.glob(os.path.join(glob.escape(str(ds_config.HF_DATASETS_CACHE)), folder,
                                          glob.escape(config) if config else "*", "*", commit)))
    found = [Path(f) for f in found if os.path.isfile(os.path.join(f, "dataset_info.json"))]
    if len(found) > 1:  # several configs prepared and none chosen: the card's default, as load_dataset picks it
        default = _default_config(name, commit)
        found = [f for f in found if f.parts[-3] == default]
    if len(found) != 1:
        return None
    return Cache(dataset_name=short, repo_id=name, config_name=found[0].parts[-3], version=found[0].parts[-2],
                 hash=commit).as_dataset()


def _default_config(name: str, commit: str) -> Optional[str]:
    """The default config named by the dataset card cached at `commit` (None without one)."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, try_to_load_from_cache
    card = try_to_load_from_cache(name, "README.md", revision=commit, repo_type="dataset")
    if not isinstance(card, str):
        return None
    try:
        return MetadataConfigs.from_dataset_card_data(DatasetCard.load(card).data).get_default_config_name()
    except ValueError:  # several defaults: none
        return None


def load_hub_dataset(ds: HubDataset, commit: str):
    """The DatasetDict of `ds` at `commit`: from datasets' cache when prepared, else downloaded by load_dataset."""
    import datasets
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetsError
    from huggingface_hub.utils import httpx
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        cached = _prepared(ds.name, ds.config, commit)
        if cached is not None:
            return cached
        if _offline():
            raise _not_cached(ds, f"(config {ds.config or 'default'}, commit {commit[:12]})")
        return datasets.load_dataset(ds.name, ds.config, revision=commit)
    except (ConnectionError, httpx.TransportError) as e:
        raise NFNetZooError(f"cannot reach the Hugging Face Hub for {ds.root} ({type(e).__name__}); "
                            f"check the network, or set HF_HUB_OFFLINE=1 to use the cached copy") from None
    except (DatasetsError, EmptyDatasetError, RuntimeError) as e:  # no data files, unreadable ones, a loading script
        raise NFNetZooError(f"datasets cannot read {ds.root} at {commit[:12]} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:150]}); check the dataset's files on the Hub") from None
    except ValueError as e:
        if "config" not in str(e).lower():
            raise
        configs = datasets.get_dataset_config_names(ds.name, revision=commit)
        given = f"has no config {ds.config!r}" if ds.config else "has several configs"
        raise NFNetZooError(f"{ds.root} {given}; its configs are {', '.join(configs)}: pass "
                            f"{ds.root}:{configs[0]}") from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def config_name(loaded) -> str:
    """The config the splits were built from, which data.json records (the default one has a name too)."""
    return next(iter(loaded.values())).info.config_name


def open_hub_id(text: str, agree: Optional[Callable[[str], str]] = None):
    """(root hfds/NAME, config name, commit, DatasetDict) of `hfds/NAME[:CONFIG][@REVISION]`; `agree` maps this
    process's commit to the one all processes use (the first's: a branch that moves meanwhile must not split them)."""
    ds = parse_hub_id(text)
    commit = resolve_revision(ds)
    if agree is not None:
        commit = agree(commit)
    loaded = load_hub_dataset(ds, commit)
    return ds.root, config_name(loaded), commit, loaded
