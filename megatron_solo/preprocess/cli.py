"""The shard-building CLI: `python -m tools.preprocess {build,merge,validate,inspect,demo}` (`solo-preprocess`)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from megatron_solo.format.chat_template import LOSS_POLICIES, TEMPLATES
from megatron_solo.preprocess.report import DEFAULT_MAX_SKIP_FRACTION
from megatron_solo.preprocess.sources import group_words, kinds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.preprocess", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_build(sub)
    _add_partition_flags(sub.choices["build"])
    _add_checks(sub)
    _add_merge(sub)
    d = sub.add_parser("demo", help="build the bundled demo shard sets (train/valid) + tokenizer")
    d.add_argument("--out", required=True)
    d.add_argument("--seq-length", type=int, default=1024)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--partitions", type=int, default=1, help="build the train split as N partitions, merged")
    d.add_argument("--quiet", action="store_true")
    return p


def _add_build(sub) -> None:
    b = sub.add_parser("build", help="raw corpora -> a shard set (resumable: re-run the same command)")
    b.add_argument(
        "--source",
        action="append",
        nargs="+",
        required=True,
        metavar="KIND:SPEC",
        help="KIND:PATH[,PATH...][,key=value...]. KIND: " + ", ".join(kinds()) + ". PATHs: files, directories, globs, "
        "{00000..00099} ranges; options per kind (template=plain|mistral, loss-on=text|assistant|last, image-root=DIR, "
        "column mappings: docs/preprocess.md). Repeatable; records are read in the order given",
    )
    b.add_argument("--tokenizer", required=True, help="SOLO-extended SentencePiece tokenizer.model")
    b.add_argument("--out", required=True, help="output shard-set directory")
    b.add_argument("--seq-length", type=int, default=32768, help="tokens per pack (default 32768)")
    b.add_argument(
        "--workers",
        type=int,
        help="decode/tokenize processes per build (default: CPUs - 1, the parent packs and writes; with M local "
        "partitions CPUs / M - 1; under --ray 3; 0: all in one process)",
    )
    b.add_argument(
        "--shard-size-packs",
        type=int,
        help="about this many packs per shard (default 256: pack fill ~0.996; docs/preprocess.md)",
    )
    b.add_argument("--seed", type=int, default=1234, help="shuffles imagefolder records (default 1234)")
    b.add_argument("--fast-decode", action="store_true", help="JPEG draft decoding before the exact resize (opt-in)")
    b.add_argument("--long-text", choices=("split", "drop"), default="split", help="text longer than a pack")
    b.add_argument(
        "--class-names",
        help="imagefolder: 'class_dir name' lines, a JSON object, or torchvision's imagenet_class_index.json "
        "(default of every imagefolder source's class-names=)",
    )
    b.add_argument("--image-root", help="default image-root= of the sources that have one (llava, chat, parquet, ...)")
    b.add_argument("--template", choices=TEMPLATES, help="default template= of every conversational source")
    b.add_argument("--loss-on", choices=LOSS_POLICIES, help="default loss-on= of every conversational source")
    b.add_argument(
        "--max-skip-fraction",
        type=float,
        default=DEFAULT_MAX_SKIP_FRACTION,
        help=f"fail the build when a source skips more than this fraction of its records (default "
        f"{DEFAULT_MAX_SKIP_FRACTION}); a source with 0 documents always fails it",
    )
    b.add_argument("--buffer-docs", type=int, default=4096, help="packer best-fit buffer (documents)")
    b.add_argument(
        "--checksum",
        choices=("xxh64", "sha256"),
        default="xxh64",
        help="per-file checksum in the manifest: xxh64 (default; `xxhsum` prints the same) or sha256 (slower; for "
        "published shard sets)",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar (logs)")


def _add_partition_flags(b: argparse.ArgumentParser) -> None:
    pg = b.add_argument_group("partitioned builds (docs/preprocess.md: sizing N and M)")
    pg.add_argument(
        "--partition",
        metavar="K/N",
        help="build only partition K of N (0-based; a deterministic byte-balanced split of the inputs) into "
        "OUT/part_K_of_N, its own resumable shard set; then `merge OUT` (what a SLURM array task runs)",
    )
    pg.add_argument("--partitions", type=int, metavar="N", help="build all N partitions, then merge them into OUT")
    pg.add_argument(
        "--local-partitions",
        type=int,
        metavar="M",
        help="run M partitions at once on this machine, each its own packer (default with --partitions: N, at most "
        "the CPU count); alone: --partitions M",
    )
    pg.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the partitions as Ray tasks (workers + 1 CPUs each) on the cluster at ADDRESS (default: "
        "RAY_ADDRESS or a local Ray); needs pip install megatron-solo[ray]",
    )
    pg.add_argument(
        "--retries",
        type=int,
        default=2,
        help="start a partition whose process was killed again this many times (it resumes; default 2)",
    )


def _add_checks(sub) -> None:
    v = sub.add_parser("validate", help="check a shard set: checksums, counts, boundaries; exit 1 on any problem")
    v.add_argument("dir")
    v.add_argument(
        "--no-checksums",
        action="store_true",
        help="skip reading every file back for its checksum (structure checks only)",
    )

    i = sub.add_parser("inspect", help="render one pack to a PNG (images from their patches, text, token kinds)")
    i.add_argument("dir")
    i.add_argument("--pack", type=int, default=0, help="global pack index")
    i.add_argument("--out", required=True, help="PNG to write")
    i.add_argument("--tokenizer", help="tokenizer.model to decode text (default: the manifest's)")


def _add_merge(sub) -> None:
    m = sub.add_parser(
        "merge",
        help="one shard set listing other shard sets (a manifest only; appends to OUT's list when run again)",
    )
    m.add_argument("out", metavar="OUT", help="the merged set's directory (its own part_K_of_N partitions are merged)")
    m.add_argument("sets", nargs="*", metavar="SET", help="more shard sets (or merged sets) to list")
    m.add_argument("--fresh", action="store_true", help="forget the sets OUT's manifest lists (start the list anew)")
    m.add_argument("--allow-partial", action="store_true", help="merge a partitioned build with partitions missing")
    m.add_argument(
        "--max-skip-fraction",
        type=float,
        default=DEFAULT_MAX_SKIP_FRACTION,
        help="the no-silent-build check on the merged counts (as build's; default %(default)s)",
    )


def _workers(args: argparse.Namespace, at_once: int | None) -> int:
    from megatron_solo.preprocess.launch import available_cpus, default_workers

    if args.workers is not None:
        return args.workers
    if args.ray is not None:
        return 3
    return default_workers(at_once) if at_once else max(1, available_cpus() - 1)


def _report(manifest_path: str, run) -> int:
    """Print the summary of what ``run()`` built; a failed check prints it too, then the errors (exit status 1)."""
    from megatron_solo.preprocess.build import BuildFailed, summary

    try:
        print(summary(run(), manifest_path))
    except BuildFailed as e:
        print(summary(e.manifest, manifest_path))
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


def _build(args: argparse.Namespace) -> int:
    from megatron_solo.preprocess.build import BuildConfig, BuildError, build
    from megatron_solo.preprocess.launch import available_cpus, build_partitioned
    from megatron_solo.preprocess.partition import Partition, partition_dir

    orchestrate = args.partitions is not None or args.local_partitions is not None or args.ray is not None
    if args.partition and orchestrate:
        raise BuildError("--partition K/N builds one partition; --partitions / --local-partitions / --ray build all")
    count = args.partitions if args.partitions is not None else args.local_partitions
    if args.ray is not None and args.partitions is None:
        raise BuildError("--ray needs --partitions N (how many tasks to split the build into)")
    at_once = None
    if orchestrate and args.ray is None:
        at_once = min(count, args.local_partitions or available_cpus())
    cfg = BuildConfig(
        sources=[spec for words in args.source for spec in group_words(words)],
        tokenizer=args.tokenizer,
        out=args.out,
        seq_length=args.seq_length,
        workers=_workers(args, at_once),
        seed=args.seed,
        fast_decode=args.fast_decode,
        long_text=args.long_text,
        class_names=args.class_names,
        image_root=args.image_root,
        template=args.template,
        loss_on=args.loss_on,
        max_skip_fraction=args.max_skip_fraction,
        buffer_docs=args.buffer_docs,
        checksum=args.checksum,
        partition=args.partition,
        quiet=args.quiet,
        **({} if args.shard_size_packs is None else {"shard_size_packs": args.shard_size_packs}),  # one default
    )
    if orchestrate:
        run = lambda: build_partitioned(cfg, count, at_once, args.ray or None, args.ray is not None, args.retries)
        return _report(os.path.join(args.out, "manifest.json"), run)
    if args.partition is None:
        return _report(os.path.join(args.out, "manifest.json"), lambda: build(cfg))
    where = partition_dir(args.out, Partition.parse(args.partition))
    rc = _report(str(where / "manifest.json"), lambda: build(cfg))
    print(f"partition {args.partition} written to {where}; the no-silent-build checks run on the merged set: "
          f"python -m tools.preprocess merge {args.out}")  # fmt: skip
    return rc


def _merge(args: argparse.Namespace) -> int:
    from megatron_solo.preprocess.build import BuildFailed
    from megatron_solo.preprocess.merge import merge
    from megatron_solo.preprocess.report import problems

    def run() -> dict:
        manifest = merge(args.out, args.sets, fresh=args.fresh, allow_partial=args.allow_partial)
        print(f"{args.out}: merged {len(manifest['merged']['sets'])} shard set(s), {len(manifest['shards'])} shards")
        found = problems(manifest, args.max_skip_fraction)
        if found:
            raise BuildFailed("\n".join(found), manifest)
        return manifest

    return _report(os.path.join(args.out, "manifest.json"), run)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # megatron-core's import chain (IndexedDataset) warns about optional GPU packages; irrelevant to shards.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron_solo.format.tokens import TokenizerError
    from megatron_solo.preprocess.build import BuildError
    from megatron_solo.preprocess.sources import SourceError

    try:
        if args.cmd == "build":
            return _build(args)
        if args.cmd == "merge":
            return _merge(args)
        if args.cmd == "validate":
            from megatron_solo.preprocess.validate import validate

            problems, report = validate(args.dir, checksums=not args.no_checksums)
            if problems:
                for msg in problems[:50]:
                    print(f"error: {msg}", file=sys.stderr)
                print(f"{args.dir}: INVALID ({len(problems)} problem(s))", file=sys.stderr)
                return 1
            print(f"{args.dir}: OK ({report})")
            return 0
        if args.cmd == "inspect":
            from megatron_solo.preprocess.inspect_pack import render_pack

            print(render_pack(args.dir, args.pack, args.out, tokenizer=args.tokenizer))
            return 0
        from megatron_solo.preprocess.demo import run_demo

        return run_demo(args.out, args.seq_length, quiet=args.quiet, workers=args.workers, partitions=args.partitions)
    except (BuildError, SourceError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
