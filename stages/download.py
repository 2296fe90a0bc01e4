"""Stage: fetch GPT-2's BPE files and every url: entry of data.sources (Tiny Shakespeare
by default), sha256-verified, into data.raw_dir.

The fixed files, URLs and checksums are gptcore/data/sources.py. Offline: set GPTCORE_MIRROR
to a directory of byte-exact copies (CI: ../shared/mirror). Local path: sources are not
copied: the tokenize stage reads them where they are.
"""

from gptcore.config import load_params
from gptcore.data.fetch import fetch_sources, prune
from gptcore.data.sources import files_to_fetch
from gptcore.stage import outputs_inside, run_stage


def main() -> None:
    params = load_params()
    outputs_inside(params)
    data = params.data
    pinned = files_to_fetch(data)
    for name, sha in fetch_sources(data.raw_dir, pinned, retries=data.retries,
                                   timeout_s=data.timeout_s).items():
        print(f"{name}: sha256 {sha} {'ok' if pinned[name].sha256 else '(not pinned)'}")
    for name in prune(data.raw_dir, pinned):
        print(f"{name}: removed (no longer a source)")


if __name__ == "__main__":
    run_stage(main)
