import subprocess
import sys
from pathlib import Path

import pytest

from epd.wire.codec import Dispatcher, WireError, pack, unpack
from epd.wire.gen import epd_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_pack_unpack_roundtrip_and_dispatch():
    msg = pb.KvReady(request_id="r1", num_prompt_tokens=7, first_token_id=3, rope_delta=-5)
    frame = pack(msg, sender="prefill-0")
    env, field, payload = unpack(frame)
    assert (env.request_id, env.sender, field) == ("r1", "prefill-0", "kv_ready")
    assert payload == msg
    seen = []
    Dispatcher({"kv_ready": lambda e, p, blobs: seen.append((p.rope_delta, blobs))}).dispatch([frame, b"x"])
    assert seen == [(-5, [b"x"])]


def test_bad_frames_raise_wire_error():
    with pytest.raises(WireError):
        unpack(b"\xff\xff\xff")
    with pytest.raises(WireError):
        unpack(pb.Envelope(request_id="x").SerializeToString())
    with pytest.raises(WireError):
        pack(pb.TensorRef(), sender="x")
    with pytest.raises(WireError):
        Dispatcher({"no_such_type": lambda *a: None})


def test_generated_code_matches_proto(tmp_path):
    """Drift check: regenerating from proto/ must reproduce the committed epd/wire/gen files."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", str(ROOT / "proto" / "epd.proto"), str(ROOT / "proto" / "admin.proto")],
        check=True,
    )
    for name in ("epd_pb2.py", "epd_pb2.pyi", "admin_pb2.py", "admin_pb2.pyi"):
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "epd" / "wire" / "gen" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"


def test_every_message_carries_request_id():
    for field in pb.Envelope.DESCRIPTOR.oneofs_by_name["payload"].fields:
        assert "request_id" in field.message_type.fields_by_name, field.message_type.name
