"""Downloads: each file pinned by its URL and checksum, kept in a cache folder, never used when it differs.

    cupl_prompts("dtd") -> ~/.cache/hegraphadapter/CuPL_prompts_dtd.json (downloaded once, sha256 checked)
"""
import hashlib
import http.client
import os
import urllib.request
from pathlib import Path

from features_file import write_atomic
from fewshot_data import CUPL_PROMPTS, DataError


def cache_dir() -> Path:
    """Where downloads are kept: $XDG_CACHE_HOME/hegraphadapter, else ~/.cache/hegraphadapter."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hegraphadapter"


def cupl_prompts(dataset: str) -> Path:
    """The CuPL descriptions of `dataset`, downloaded once from CUPL_PROMPTS into cache_dir(); the file's sha256
    is checked before every use, so a download that is cut short or altered is never used."""
    if dataset not in CUPL_PROMPTS:
        raise DataError(f"--prompts cupl: no CuPL descriptions are pinned for '{dataset}' (there are for "
                        f"{', '.join(CUPL_PROMPTS)}); pass --prompts FILE.json of {{classname: [sentence, ...]}}")
    url, sha256 = CUPL_PROMPTS[dataset]
    path = cache_dir() / url.rsplit("/", 1)[-1]
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    print(f"downloading the CuPL prompts of {dataset} from {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:  # no network, HTTP errors, a connection cut short
        raise DataError(f"--prompts cupl: cannot download {url} ({e}); download it by hand and pass "
                        f"--prompts FILE") from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise DataError(f"--prompts cupl: {url} has sha256 {found}, not the pinned {sha256} (a broken download, "
                        f"or the file changed); nothing was cached or used")
    write_atomic(path, lambda f: f.write(data))
    return path
