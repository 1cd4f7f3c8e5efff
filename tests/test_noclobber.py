"""No job overwrites a file it did not write: a taken output name fails its input at planning (--resume keeps the
file, --overwrite replaces it only where DST's manifest records it as a pidray output), and the write itself never
replaces a file that appeared after planning (local: a no-replace link; S3: If-None-Match on the PUT or on the
multipart completion)."""

import json
import os

import pytest
from PIL import Image

from jobs.manifest import MANIFEST_NAME, read_manifest
from jobs.pipeline import JobConfig, run_job
from pipeline.errors import OutputExists, SetupError
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions
from pipeline.storage import PART_BYTES, Location, S3Settings

from conftest import ROOT, make_tiny_gemma, make_tiny_t2i

USER = b"the user's own file, not an image pidray made"


def _save(path, color=(200, 30, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")


def _src(tmp_path, names=("a.png", "b.png")):
    for i, n in enumerate(names):
        _save(tmp_path / "in" / n, color=(40 * i, 200, 30))
    return tmp_path / "in"


def _job(src, dst, weights, **kw) -> JobConfig:
    return JobConfig(str(src), str(dst), ModelOptions(weights=weights), UpscaleOptions(), local=True, progress=False,
                     **kw)  # fmt: skip


def _rows(dst) -> dict[str, dict]:
    loc = dst if isinstance(dst, Location) else Location(str(dst))
    return {r["key"]: r for r in read_manifest(loc)}


def _cli(*args, check_rc=None):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pidray.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if check_rc is not None:
        assert out.returncode == check_rc, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return out


# ---------------------------------------------------------------------------------------------- planning
def test_a_plain_job_never_replaces_a_users_file(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path), tmp_path / "out"
    dst.mkdir()
    (dst / "a.png").write_bytes(USER)
    summary = run_job(_job(src, dst, bicubic_weights))
    assert (dst / "a.png").read_bytes() == USER
    assert summary.ok == 1 and summary.failed == 1
    rows = _rows(dst)
    a = rows["a.png"]
    assert a["status"] == "failed" and a["error_kind"] == "exists" and a["output_key"] == ""
    assert "'a.png' already exists in DST" in a["error"] and "--resume" in a["error"] and "--overwrite" in a["error"]
    assert rows["b.png"]["status"] == "ok" and Image.open(dst / "b.png").size == (48, 40)


def test_overwrite_replaces_only_outputs_a_manifest_records(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path, ("a.png", "b.png", "d.png")), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 3
    made = (dst / "a.png").read_bytes()
    (dst / "a.png").write_bytes(b"stale")  # an earlier output, changed since: no longer what pidray wrote
    _save(src / "c.png", color=(0, 0, 250))
    (dst / "c.png").write_bytes(USER)  # the user's, at the output name of a new input
    d_inode = (dst / "d.png").stat().st_ino  # pidray's own, as it wrote it

    with pytest.raises(SetupError, match="already holds this job's outputs from an earlier pidray run .*--resume"):
        run_job(_job(src, dst, bicubic_weights))  # without a flag: refused before any model loads, nothing touched
    plain = run_job(_job(src, dst, bicubic_weights, dry_run=True))  # what each taken name would be
    assert plain.planned == 0 and plain.failed == 4
    rows = {r["key"]: r for r in plain.rows}
    assert "an earlier pidray job wrote it" in rows["b.png"]["error"] and rows["b.png"]["output_key"] == "b.png"
    assert "changed since a pidray job wrote it" in rows["a.png"]["error"] and rows["a.png"]["output_key"] == ""
    assert "not written by pidray" in rows["c.png"]["error"] and rows["c.png"]["output_key"] == ""
    assert (dst / "a.png").read_bytes() == b"stale" and (dst / "c.png").read_bytes() == USER

    again = run_job(_job(src, dst, bicubic_weights, overwrite=True))  # the record survived the plain run
    assert again.ok == 2 and again.failed == 2
    assert (dst / "a.png").read_bytes() == b"stale" and (dst / "c.png").read_bytes() == USER
    assert (dst / "d.png").stat().st_ino != d_inode and (dst / "b.png").is_file()  # replaced: written anew
    rows = _rows(dst)
    assert rows["b.png"]["status"] == "ok" and rows["d.png"]["status"] == "ok"
    for k in ("a.png", "c.png"):
        assert rows[k]["status"] == "failed" and rows[k]["error_kind"] == "exists"
        assert "--overwrite does not replace it" in rows[k]["error"] and f"'{k}'" in rows[k]["error"]
    assert made != b"stale"


def test_resume_still_keeps_what_is_done(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path), tmp_path / "out"
    assert run_job(_job(src, dst, bicubic_weights)).ok == 2
    (dst / "b.png").unlink()
    summary = run_job(_job(src, dst, bicubic_weights, resume=True))
    assert (summary.ok, summary.skipped, summary.failed) == (1, 1, 0)
    assert _rows(dst)["a.png"]["status"] == "ok" and (dst / "b.png").is_file()  # done earlier: still ok


def test_a_dry_run_shows_the_taken_name(bicubic_weights, tmp_path):
    src, dst = _src(tmp_path), tmp_path / "out"
    dst.mkdir()
    (dst / "a.png").write_bytes(USER)
    summary = run_job(_job(src, dst, bicubic_weights, dry_run=True))
    rows = {r["key"]: r for r in summary.rows}
    assert rows["a.png"]["status"] == "failed" and "already exists" in rows["a.png"]["error"]
    assert rows["b.png"]["status"] == "planned" and (dst / "a.png").read_bytes() == USER


@pytest.mark.parametrize("cmd", ["upscale", "decode", "generate"])
def test_overwrite_with_resume_is_refused_up_front(bicubic_weights, tmp_path, cmd):
    src = _src(tmp_path)
    if cmd == "generate":
        (tmp_path / "p.txt").write_text("a cat\n")
        args = ["generate", "--prompts", str(tmp_path / "p.txt")]
    else:
        args = [cmd, str(src)]
    out = _cli(*args, str(tmp_path / "out"), "--local", "--weights", bicubic_weights, "--overwrite", "--resume",
               check_rc=2)  # fmt: skip
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--overwrite and --resume" in lines[0], out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_overwrite_is_not_for_a_single_image(tmp_path):
    out = _cli("generate", "a cat", str(tmp_path / "cat.png"), "--overwrite", check_rc=2)
    assert "never overwritten" in out.stderr and not (tmp_path / "cat.png").exists()


# ---------------------------------------------------------------------------------------------- the write itself
def _appear_before_write(monkeypatch, key: str, make):
    """Create `key` (by `make(location)`) just before the job's write of it: after planning, as another writer
    would."""
    from pipeline.stages import io as stage_io

    orig = stage_io.WriteStage.process

    def process(self, row):
        if row["output_stem"] + row["extension"] == key:
            make(self.dst)
        return orig(self, row)

    monkeypatch.setattr(stage_io.WriteStage, "process", process)


def test_a_file_appearing_after_planning_is_not_replaced(bicubic_weights, tmp_path, monkeypatch):
    src, dst = _src(tmp_path), tmp_path / "out"
    _appear_before_write(monkeypatch, "a.png", lambda loc: (dst / "a.png").write_bytes(USER))
    summary = run_job(_job(src, dst, bicubic_weights))
    assert (dst / "a.png").read_bytes() == USER and summary.ok == 1 and summary.failed == 1
    a = _rows(dst)["a.png"]
    assert a["status"] == "failed" and a["error_kind"] == "exists" and "appeared in DST" in a["error"]
    assert sorted(p.name for p in dst.iterdir()) == sorted(["a.png", "b.png", MANIFEST_NAME])  # no temporaries


def test_an_allowed_overwrite_still_refuses_a_name_it_was_not_allowed(bicubic_weights, tmp_path, monkeypatch):
    """--overwrite allows replacing the recorded a.png only: a file appearing at b.png (not there when planned)
    is kept."""
    src, dst = _src(tmp_path), tmp_path / "out"
    run_job(_job(src, dst, bicubic_weights))
    (dst / "b.png").unlink()
    _appear_before_write(monkeypatch, "b.png", lambda loc: (dst / "b.png").write_bytes(USER))
    summary = run_job(_job(src, dst, bicubic_weights, overwrite=True))
    assert summary.ok == 1 and (dst / "b.png").read_bytes() == USER
    assert "appeared in DST" in _rows(dst)["b.png"]["error"]


def test_local_write_never_replaces_unless_asked(tmp_path):
    loc = Location(str(tmp_path / "dst"))
    loc.write("x/a.png", b"one")
    with pytest.raises(OutputExists, match="'x/a.png' appeared in DST") as e:
        loc.write("x/a.png", b"two")
    assert e.value.key == "x/a.png" and e.value.kind == "exists"  # the input is fine: its output's name is taken
    assert (tmp_path / "dst" / "x" / "a.png").read_bytes() == b"one"
    assert os.listdir(tmp_path / "dst" / "x") == ["a.png"]  # the temporary is gone
    (tmp_path / "elsewhere").write_bytes(b"target")
    (tmp_path / "dst" / "link.png").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputExists):
        loc.write("link.png", b"two")  # a link at the name is refused too: neither followed nor replaced
    assert (tmp_path / "elsewhere").read_bytes() == b"target" and (tmp_path / "dst" / "link.png").is_symlink()
    loc.write("x/a.png", b"two", overwrite=True)
    assert (tmp_path / "dst" / "x" / "a.png").read_bytes() == b"two"


# ---------------------------------------------------------------------------------------------- S3
def _bucket(s3_server, name):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    return s3


@pytest.mark.slow
def test_s3_writes_are_conditional_single_put_and_multipart(s3_server):
    s3 = _bucket(s3_server, "noclobber")
    loc = Location("s3://noclobber/out", S3Settings(endpoint_url=s3_server, region="us-east-1"))
    loc.write("small.png", b"one")
    with pytest.raises(OutputExists):
        loc.write("small.png", b"two")
    assert s3.get_object(Bucket="noclobber", Key="out/small.png")["Body"].read() == b"one"
    big = os.urandom(PART_BYTES + 12345)  # above the part size: a multipart upload, completed conditionally
    loc.write("big.png", big)
    assert s3.get_object(Bucket="noclobber", Key="out/big.png")["Body"].read() == big
    with pytest.raises(OutputExists):
        loc.write("big.png", big[::-1])
    assert s3.get_object(Bucket="noclobber", Key="out/big.png")["Body"].read() == big
    assert not s3.list_multipart_uploads(Bucket="noclobber").get("Uploads")  # the refused upload was aborted
    loc.write("big.png", big[::-1], overwrite=True)
    loc.write("small.png", b"two", overwrite=True)
    assert s3.get_object(Bucket="noclobber", Key="out/big.png")["Body"].read() == big[::-1]
    assert s3.get_object(Bucket="noclobber", Key="out/small.png")["Body"].read() == b"two"


@pytest.mark.slow
def test_s3_a_users_object_and_one_appearing_after_planning_are_kept(s3_server, bicubic_weights, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    s3 = _bucket(s3_server, "noclobber-job")
    src = _src(tmp_path, ("a.png", "b.png", "c.png"))
    s3.put_object(Bucket="noclobber-job", Key="out/c.png", Body=USER)  # there before the job
    settings = S3Settings(endpoint_url=s3_server, region="us-east-1")
    dst = Location("s3://noclobber-job/out", settings)
    _appear_before_write(monkeypatch, "a.png", lambda loc: s3.put_object(Bucket="noclobber-job", Key="out/a.png",
                                                                         Body=USER))  # fmt: skip
    summary = run_job(_job(src, dst.uri, bicubic_weights, s3=settings))
    assert summary.ok == 1 and summary.failed == 2
    for k in ("a.png", "c.png"):
        assert s3.get_object(Bucket="noclobber-job", Key=f"out/{k}")["Body"].read() == USER
    rows = _rows(dst)
    assert "appeared in DST" in rows["a.png"]["error"] and "already exists in DST" in rows["c.png"]["error"]
    assert rows["b.png"]["status"] == "ok"
    monkeypatch.undo()
    again = run_job(_job(src, dst.uri, bicubic_weights, s3=settings, overwrite=True))  # b.png is pidray's own
    assert again.ok == 1 and again.failed == 2 and _rows(dst)["b.png"]["status"] == "ok"
    for k in ("a.png", "c.png"):
        assert s3.get_object(Bucket="noclobber-job", Key=f"out/{k}")["Body"].read() == USER


# ---------------------------------------------------------------------------------------------- prompt files
@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2i")
    return {"preset": str(make_tiny_t2i(d)), "gemma": str(make_tiny_gemma(d / "gemma"))}


def test_a_prompt_job_never_replaces_a_users_file(t2i, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [{"prompt": "a cat", "name": "cat"},
                                                         {"prompt": "a dog", "name": "dog"}]))  # fmt: skip
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "cat.png").write_bytes(USER)
    model = ModelOptions(t2i["preset"], text_encoder=t2i["gemma"])

    def job(**kw):
        return run_job(JobConfig(str(prompts), str(dst), model=model, options=UpscaleOptions(format="png"),
                                 local=True, progress=False, workflow="generate", **kw))  # fmt: skip

    summary = job()
    assert summary.ok == 1 and summary.failed == 1 and (dst / "cat.png").read_bytes() == USER
    rows = {int(r["key"].rsplit(":", 1)[1]): r for r in read_manifest(Location(str(dst)))}
    assert "line 1: its output 'cat.png' already exists" in rows[1]["error"] and rows[2]["status"] == "ok"
    dog = (dst / "dog.png").read_bytes()
    dog_inode = (dst / "dog.png").stat().st_ino
    again = job(overwrite=True)
    assert again.ok == 1 and (dst / "dog.png").read_bytes() == dog and (dst / "cat.png").read_bytes() == USER
    assert (dst / "dog.png").stat().st_ino != dog_inode  # pidray's own output: replaced by a new write
