"""Datasets by name, streamed (``--data_in_memory off``) against held (``on``): a Parquet (``hf:``)
and a tfds (``tfds:``) copy of hymenoptera (the original JPEG bytes, not re-encoded), timed as
benchmarks.stream times a source: whole epochs (train + the student's val outputs; ResNet-18
``fc``, random ResNet-50 teacher, batch 32, 112 px), interleaved, a compiling round then
``--rounds`` rounds, medians. Each source runs in a fresh process; the sets are written once
under ``--work``.

    python -m benchmarks.datasets --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
HYM = REPO.parent / "shared" / "data" / "hymenoptera_data"
WORK = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "kdjax-bench-datasets"
CLASSES = ["ants", "bees"]

BUILDER = '''
import pathlib
import tensorflow_datasets as tfds
HYM = pathlib.Path("%s")
class HymenopteraJpeg(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["ants", "bees"])}), supervised_keys=("image", "label"))
    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "validation": self._generate_examples("val")}
    def _generate_examples(self, split):
        for c, cls in enumerate(["ants", "bees"]):
            for p in sorted((HYM / split / cls).iterdir()):
                if p.suffix.lower() in (".jpg", ".jpeg"):
                    yield p.name, {"image": p.read_bytes(), "label": c}
''' % HYM


def files(split):
    return [(p, c) for c, cls in enumerate(CLASSES) for p in sorted((HYM / split / cls).iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg")]


def make_parquet(root):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if (root / ".complete").exists():
        return
    (root / "data").mkdir(parents=True, exist_ok=True)
    features = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
    meta = json.dumps({"info": {"features": features}})
    for split, name in (("train", "train"), ("val", "validation")):
        rows = files(split)
        t = pa.table({"image": pa.array([{"bytes": p.read_bytes(), "path": p.name} for p, _ in rows],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array([c for _, c in rows], pa.int64())})
        t = t.replace_schema_metadata({"huggingface": meta})
        pq.write_table(t, root / "data" / f"{name}-00000-of-00001.parquet", row_group_size=100)
    (root / ".complete").touch()


def make_tfds(root):
    if (root / ".complete").exists():
        return
    pkg = root / "code" / "hym_builder"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "b.py").write_text(BUILDER)
    sys.path.insert(0, str(root / "code"))
    from hym_builder.b import HymenopteraJpeg  # noqa: E402 (written just above)
    HymenopteraJpeg(data_dir=str(root / "data"), file_format="array_record").download_and_prepare()
    (root / ".complete").touch()


def child(spec, tfds_dir, cache, rounds, image_size=112, batch=32):
    from kdjax import xla_cpu

    xla_cpu.apply()
    from benchmarks.stream import held_against_streamed
    from kdjax import data
    from kdjax.data import sources

    opts = sources.SourceOptions(tfds_data_dir=tfds_dir) if spec.startswith("tfds:") else sources.SourceOptions()
    prep = {}

    def load(in_memory):
        t0 = time.perf_counter()
        ds = data.load_splits(sources.open_data(spec, None, opts), image_size=image_size, cache_dir=cache,
                              in_memory=in_memory)
        prep[in_memory] = {"load_s": time.perf_counter() - t0, "decoded": ds.decoded}
        return ds

    out, paths = held_against_streamed(load, image_size, rounds, batch)
    out.update(spec=spec, num_train=paths["in_memory"][0]["train"].num_examples,
               num_val=paths["in_memory"][0]["val"].num_examples, load=prep)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--only", nargs="*", default=["hf", "tfds"], choices=("hf", "tfds"))
    ap.add_argument("--work", type=pathlib.Path, default=WORK, help="where the two sets and caches go")
    a = ap.parse_args()
    work = a.work
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.child[2], a.rounds)))
        return
    if not HYM.is_dir():
        sys.exit(f"benchmarks.datasets: no hymenoptera tree at {HYM} (../shared/data beside the checkout)")
    make_parquet(work / "parquet")
    make_tfds(work / "tfds")
    for kind in a.only:
        spec = f"hf:{work / 'parquet'}" if kind == "hf" else "tfds:hymenoptera_jpeg"
        cache = work / f"cache_{kind}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.datasets", "--rounds", str(a.rounds), "--child",
                              spec, str(work / "tfds" / "data"), str(cache)], capture_output=True, text=True,
                             cwd=REPO)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            sys.exit(1)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
