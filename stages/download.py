"""Stage: fetch Tiny Shakespeare and GPT-2's BPE files, sha256-verified, into data.raw_dir.

The files, URLs and checksums are gptcore/sources.py. Offline: set GPTCORE_MIRROR to a
directory of byte-exact copies (CI: ../shared/mirror).
"""

from gptcore.config import load_params
from gptcore.fetch import fetch_sources
from gptcore.stage import run_stage


def main() -> None:
    data = load_params().data
    for name, sha in fetch_sources(data.raw_dir, retries=data.retries, timeout_s=data.timeout_s).items():
        print(f"{name}: sha256 {sha} ok")


if __name__ == "__main__":
    run_stage(main)
