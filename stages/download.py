"""Stage: fetch Tiny Shakespeare and GPT-2's BPE files, sha256-verified, into data/raw.

Offline: set GPTCORE_MIRROR to a directory of byte-exact copies (CI: ../shared/mirror).
"""

from gptcore.config import load_params
from gptcore.data import fetch_sources
from gptcore.stage import run_stage


def main() -> None:
    params = load_params()
    for name, sha in fetch_sources(params.data, params.data.raw_dir).items():
        print(f"{name}: sha256 {sha} ok")


if __name__ == "__main__":
    run_stage(main)
