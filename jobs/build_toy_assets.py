"""Build the shapes world's models with fixed seeds, in the ecosystem's formats (distar.toy.build).

    python jobs/build_toy_assets.py [--out DIR] [--quick]

Writes reader/, clip/, pickscore/, reference/ (a diffusers StableDiffusionPipeline folder),
report.json and samples.png under DIR (default: the package's shipped assets,
platform/distar/toy/assets). --quick trains each part for a few steps only: it checks the build,
not the models.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # runnable from a bare checkout

from distar import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from distar.toy import assets

    p = cli.Parser("jobs/build_toy_assets.py", __doc__)
    p.add_argument("--out", type=Path, default=assets.ASSETS, help="where the assets go (default: the package's shipped ones)")
    p.add_argument("--quick", action="store_true", help="a few steps per part: checks the build, not the models")
    args = p.parse_args(argv)

    def build() -> None:
        from distar.toy.build import FULL, QUICK, build

        build(args.out, QUICK if args.quick else FULL)

    return cli.run(build)


if __name__ == "__main__":
    sys.exit(main())
