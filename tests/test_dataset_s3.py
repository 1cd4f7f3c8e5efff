"""Dataset jobs with s3:// SRC and DST, against a real S3-compatible server (moto): shards and tables listed under a
prefix and read as they stream (a tar) or by ranged GETs (a table), outputs published as one conditional PUT or a
multipart upload completed at the end, proven pidray's by their own metadata; local → S3, S3 → S3 (the local loop and
Ray), S3 → local; --resume; an object pidray did not write is never replaced, one there before the job or one that
appears while it runs."""

from __future__ import annotations

import io
import os

import boto3
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_dataset_job import make_table, members, photo
from test_datasets import make_tar

from jobs.manifest import read_manifest
from pidray.cli import main
from pipeline.datasets import ShardReader, TableReader
from pipeline.datasets.storage import S3Published
from pipeline.errors import OutputExists
from pipeline.storage import PART_BYTES, Location, S3Settings

pytestmark = pytest.mark.slow  # a moto server


def bucket(s3_server, name: str):
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    return s3


def upscale(s3_server, src, dst, *flags) -> int:
    return main(["upscale", str(src), str(dst), "--device", "cpu", "--no-progress", "--s3-endpoint", s3_server,
                 *map(str, flags)])  # fmt: skip


def rows_of(s3_server, uri: str) -> dict[str, dict]:
    rows = read_manifest(Location(uri, S3Settings(endpoint_url=s3_server, region="us-east-1")))
    return {r["key"]: r for r in rows}


def shards(tmp_path):
    """A local folder of two shards (one in a sub-folder): captions, JSON members; every sample upscales."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "00000.tar").write_bytes(make_tar(members()[:5]))
    (src / "sub" / "00001.tar").write_bytes(make_tar([(f"{k}.png", photo("chelsea.png", 12)) for k in "xyz"]))
    return src


def put_folder(s3, name: str, prefix: str, folder) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            s3.put_object(Bucket=name, Key=f"{prefix}/{p.relative_to(folder).as_posix()}", Body=p.read_bytes())


def get(s3, name: str, key: str) -> bytes:
    return s3.get_object(Bucket=name, Key=key)["Body"].read()


def test_local_to_s3_s3_to_s3_and_resume(s3_server, tmp_path):
    """Local shards into S3 and the same shards from S3 into S3 (the format recognised from the prefix): the same
    bytes, samples in order, each object carrying the id of the job that wrote it (its manifest row's `written_by`);
    again: refused without --resume, kept (not rewritten) with it. A table from S3 (ranged reads) into S3: its schema,
    rows and other columns."""
    s3 = bucket(s3_server, "ds-round")
    src = shards(tmp_path)
    assert upscale(s3_server, src, "s3://ds-round/out") == 0
    put_folder(s3, "ds-round", "in", src)
    assert upscale(s3_server, "s3://ds-round/in", "s3://ds-round/out2") == 0  # recognised: only .tar objects
    for key in ("00000.tar", "sub/00001.tar"):
        assert get(s3, "ds-round", f"out/{key}") == get(s3, "ds-round", f"out2/{key}"), key
    got = list(ShardReader(io.BytesIO(get(s3, "ds-round", "out2/00000.tar")), "00000.tar"))
    assert [s.key for s in got] == ["coffee", "chelsea"] and got[0].caption == "a cup of coffee"
    assert Image.open(io.BytesIO(got[1].image)).size[0] == 24 * 4
    assert [s.key for s in ShardReader(io.BytesIO(get(s3, "ds-round", "out2/sub/00001.tar")), "x")] == list("xyz")
    rows = rows_of(s3_server, "s3://ds-round/out2")
    meta = s3.head_object(Bucket="ds-round", Key="out2/00000.tar")["Metadata"]
    assert rows["00000.tar"]["written_by"] == meta["pidray-job"] and rows["sub/00001.tar#y"]["status"] == "ok"
    assert rows["00000.tar"]["out_bytes"] == len(get(s3, "ds-round", "out2/00000.tar"))

    before = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket="ds-round", Prefix="out2/")["Contents"]}
    assert upscale(s3_server, "s3://ds-round/in", "s3://ds-round/out2", "--dataset", "webdataset") == 2
    assert upscale(s3_server, "s3://ds-round/in", "s3://ds-round/out2", "--dataset", "webdataset", "--resume") == 0
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket="ds-round", Prefix="out2/")["Contents"]}
    assert {k: v for k, v in after.items() if k.endswith(".tar")} == {k: v for k, v in before.items()
                                                                      if k.endswith(".tar")}  # fmt: skip
    assert {r["status"] for r in rows_of(s3_server, "s3://ds-round/out2").values()} == {"ok"}

    table = make_table(tmp_path / "t.parquet")
    s3.put_object(Bucket="ds-round", Key="tables/t.parquet", Body=(tmp_path / "t.parquet").read_bytes())
    assert upscale(s3_server, "s3://ds-round/tables", "s3://ds-round/tout", "--dataset", "parquet",
                   "--caption-column", "text") == 3  # fmt: skip
    back = pq.read_table(io.BytesIO(get(s3, "ds-round", "tout/t.parquet")))
    assert back.schema.equals(table.schema, check_metadata=False) and back.drop(["image"]).equals(table.drop(["image"]))
    assert [s.ok for s in TableReader(io.BytesIO(get(s3, "ds-round", "tout/t.parquet")), "t")] == [True, False] * 2
    assert not s3.list_multipart_uploads(Bucket="ds-round").get("Uploads")


def test_s3_to_s3_on_ray_is_the_local_loops_byte_for_byte(s3_server, ray_local, tmp_path):
    """Shards read from S3 and published to S3 by Ray's workers: the local loop's outputs on local disk, byte for
    byte, with the same manifest rows."""
    s3 = bucket(s3_server, "ds-ray")
    src = shards(tmp_path)
    put_folder(s3, "ds-ray", "in", src)
    assert upscale(s3_server, src, tmp_path / "local", "--local") == 0
    assert upscale(s3_server, "s3://ds-ray/in", "s3://ds-ray/out", "--dataset", "webdataset", "--ray") == 0
    for key in ("00000.tar", "sub/00001.tar"):
        assert get(s3, "ds-ray", f"out/{key}") == (tmp_path / "local" / key).read_bytes(), key
    rows = rows_of(s3_server, "s3://ds-ray/out")
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {
        "00000.tar", "00000.tar#coffee", "00000.tar#chelsea", "sub/00001.tar", *(f"sub/00001.tar#{k}" for k in "xyz")
    }  # fmt: skip
    assert (
        s3.head_object(Bucket="ds-ray", Key="out/00000.tar")["Metadata"]["pidray-job"]
        == rows["00000.tar"]["written_by"]
    )


def test_an_object_pidray_did_not_write_is_never_replaced(s3_server, tmp_path, monkeypatch):
    """One object at an output's key before the job (refused at planning), one that appears after the job looked
    (S3 refuses the conditional PUT): both kept byte for byte, their shards failed with the reason, nothing else
    written there; --overwrite replaces neither."""
    from jobs import datasets

    s3 = bucket(s3_server, "ds-keep")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a", "b", "c"):
        (src / f"{name}.tar").write_bytes(make_tar([(f"{name}.png", photo("chelsea.png", 12))]))
    s3.put_object(Bucket="ds-keep", Key="out/a.tar", Body=b"mine")
    found = datasets.Outputs.found

    def appears(self, rel):  # b.tar appears once the job has looked
        if rel == "b.tar":
            s3.put_object(Bucket="ds-keep", Key="out/b.tar", Body=b"theirs")
            return None
        return found(self, rel)

    monkeypatch.setattr(datasets.Outputs, "found", appears)
    assert upscale(s3_server, src, "s3://ds-keep/out") == 3
    monkeypatch.undo()
    assert get(s3, "ds-keep", "out/a.tar") == b"mine" and get(s3, "ds-keep", "out/b.tar") == b"theirs"
    rows = rows_of(s3_server, "s3://ds-keep/out")
    assert rows["a.tar"]["status"] == "failed" and "not written by pidray" in rows["a.tar"]["error"]
    assert rows["b.tar#b"]["status"] == "failed" and "appeared in DST while it was written" in rows["b.tar#b"]["error"]
    assert rows["c.tar"]["status"] == "ok" and "b.tar" not in rows  # a shard published, or its samples say why
    assert upscale(s3_server, src, "s3://ds-keep/out", "--overwrite") == 3
    assert get(s3, "ds-keep", "out/a.tar") == b"mine" and get(s3, "ds-keep", "out/b.tar") == b"theirs"
    assert not s3.list_multipart_uploads(Bucket="ds-keep").get("Uploads")


def test_the_s3_publisher_puts_once_or_completes_a_multipart_upload_at_the_end(s3_server, monkeypatch):
    """At most PART_BYTES: one PUT; above: a multipart upload. Both conditional (never over an object), tagged with
    the job's id, their local temporary removed; an upload that fails part-way is aborted (nothing in S3); a
    replacement is conditional on the version it was planned on."""
    s3 = bucket(s3_server, "ds-pub")
    loc = Location("s3://ds-pub/out", S3Settings(endpoint_url=s3_server, region="us-east-1"))

    def publish(key, data, **kw):
        out = S3Published(loc, key, tag="0123456789ab", **kw)
        out.file.write(data)
        tmp = out.tmp
        try:
            return out.publish()
        finally:
            assert not os.path.exists(tmp) and os.path.basename(tmp).startswith(".pidray-0123456789ab-")

    big = os.urandom(PART_BYTES + 4321)
    assert publish("s/a.tar", b"small") == "s3://ds-pub/out/s/a.tar"
    publish("s/big.tar", big)
    assert get(s3, "ds-pub", "out/s/a.tar") == b"small" and get(s3, "ds-pub", "out/s/big.tar") == big
    assert s3.head_object(Bucket="ds-pub", Key="out/s/big.tar")["Metadata"]["pidray-job"] == "0123456789ab"
    for key, data in (("s/a.tar", b"other"), ("s/big.tar", big[::-1])):
        with pytest.raises(OutputExists, match="appeared in DST"):
            publish(key, data)
    assert get(s3, "ds-pub", "out/s/a.tar") == b"small" and get(s3, "ds-pub", "out/s/big.tar") == big

    client = loc.client
    upload_part = client.upload_part
    parts = []

    def failing(**kw):
        parts.append(kw["PartNumber"])
        if kw["PartNumber"] == 2:
            raise ConnectionError("the network went away")
        return upload_part(**kw)

    monkeypatch.setattr(client, "upload_part", failing)
    with pytest.raises(ConnectionError):
        publish("s/cut.tar", big)
    monkeypatch.undo()
    assert parts == [1, 2] and "Contents" not in s3.list_objects_v2(Bucket="ds-pub", Prefix="out/s/cut")
    assert not s3.list_multipart_uploads(Bucket="ds-pub").get("Uploads")

    etag = s3.head_object(Bucket="ds-pub", Key="out/s/a.tar")["ETag"]
    with pytest.raises(OutputExists, match="changed in DST"):
        publish("s/a.tar", b"new", replace=True, etag='"0000"')
    publish("s/a.tar", b"new", replace=True, etag=etag)
    assert get(s3, "ds-pub", "out/s/a.tar") == b"new"
