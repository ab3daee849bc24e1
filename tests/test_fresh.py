"""`--fresh` never destroys a run: the old run dir is moved aside, locally and in S3."""

from __future__ import annotations

from raytune_ft import storage as st
from raytune_ft.launch.driver import keep_aside
from raytune_ft.spec import spec_from_dict
from tests.specs import base_doc

pytest_plugins = ["tests.s3server"]


def test_fresh_moves_a_local_run_aside(tmp_path):
    spec = spec_from_dict(base_doc(name="r", storage={"path": str(tmp_path)}))
    assert keep_aside(spec) is None  # nothing to move
    (tmp_path / "r" / "checkpoint-00000004").mkdir(parents=True)
    (tmp_path / "r" / "checkpoint-00000004" / "a.bin").write_bytes(b"weights")
    aside = keep_aside(spec)
    assert aside is not None and aside.startswith(str(tmp_path / "r.old-"))
    assert not (tmp_path / "r").exists()
    assert (tmp_path / aside.split("/")[-1] / "checkpoint-00000004" / "a.bin").read_bytes() == b"weights"


def test_fresh_moves_an_s3_run_aside(s3_bucket, s3_env):
    spec = spec_from_dict(base_doc(name="r", storage={"path": f"s3://{s3_bucket}/runs",
                                                       "endpoint_url": s3_env.endpoint_url}))
    fs, root = st.pyarrow_filesystem(spec.storage)
    st.write_bytes(fs, f"{root}/r/checkpoint-00000004/a.bin", b"weights")
    st.write_bytes(fs, f"{root}/r/metrics.jsonl", b"{}\n")
    aside = keep_aside(spec)
    assert aside is not None and "/runs/r.old-" in aside
    assert not st.exists(fs, f"{root}/r")
    assert st.read_bytes(fs, f"{aside}/checkpoint-00000004/a.bin") == b"weights"
    assert st.read_bytes(fs, f"{aside}/metrics.jsonl") == b"{}\n"


def test_fresh_twice_in_one_second_keeps_both(tmp_path):
    spec = spec_from_dict(base_doc(name="r", storage={"path": str(tmp_path)}))
    asides = []
    for i in range(3):  # well under a second apart
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "marker").write_text(str(i))
        asides.append(keep_aside(spec))
    assert len(set(asides)) == 3
    assert sorted((tmp_path / a.split("/")[-1] / "marker").read_text() for a in asides) == ["0", "1", "2"]
