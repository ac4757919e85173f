import json
import logging
import subprocess
import time
from dataclasses import asdict

import pytest
import redis

from epd.registry.registry import FeatureEntry, Heartbeat, InstanceInfo, Registry, RegistryError, redact_url
from tests.conftest import _redis_server_binary, free_port


def test_register_discover_deregister(clean_redis):
    reg = Registry(clean_redis)
    reg.put_instance(InstanceInfo("enc-0", ["encoder"], "tcp://127.0.0.1:1", load={"queued_images": 2}), 5)
    reg.put_instance(InstanceInfo("dec-0", ["decode"], "tcp://127.0.0.1:2"), 5)
    assert [i.instance_id for i in reg.instances()] == ["dec-0", "enc-0"]
    enc = reg.instances("encoder")
    assert [(i.instance_id, i.inbox, i.load) for i in enc] == [("enc-0", "tcp://127.0.0.1:1", {"queued_images": 2})]
    reg.remove_instance("enc-0")
    assert reg.instances("encoder") == []


def test_heartbeat_refreshes_and_expiry_removes(clean_redis):
    reg = Registry(clean_redis)
    info = InstanceInfo("pre-0", ["prefill"], "tcp://127.0.0.1:3")
    load = {"queued_tokens": 0.0}
    hb = Heartbeat(reg, info, lambda: dict(load), period_s=0.1, ttl_s=0.4)
    hb.beat()
    hb.start()
    load["queued_tokens"] = 42.0
    time.sleep(0.8)  # two TTLs: alive only because of the heartbeat
    [seen] = reg.instances("prefill")
    assert seen.load == {"queued_tokens": 42.0}
    hb.stop(deregister=False)  # a crash: no deregistration
    time.sleep(0.6)
    assert reg.instances("prefill") == []


def test_heartbeat_stop_deregisters(clean_redis):
    reg = Registry(clean_redis)
    hb = Heartbeat(reg, InstanceInfo("d", ["decode"], "tcp://x:1"), dict, period_s=0.1, ttl_s=10)
    hb.beat()
    hb.start()
    hb.stop()
    assert reg.instances() == []


def test_feature_metadata_ttl_and_holder_guard(clean_redis):
    reg = Registry(clean_redis)
    entry = FeatureEntry("enc-0", "shm://x/1/2", 256, 1024, "float32", [4, 64], [1, 4, 4])
    reg.put_feature("abc", entry, ttl_s=5)
    assert reg.get_feature("abc") == entry
    reg.delete_feature("abc", holder="enc-1")  # not the holder: kept
    assert reg.get_feature("abc") == entry
    reg.delete_feature("abc", holder="enc-0")
    assert reg.get_feature("abc") is None
    reg.put_feature("short", entry, ttl_s=0.2)
    time.sleep(0.4)
    assert reg.get_feature("short") is None


def test_unreachable_redis_raises_registry_error():
    reg = Registry(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RegistryError):
        reg.ping()
    with pytest.raises(RegistryError):
        reg.instances()


# -- signed entries (EPD_CLUSTER_SECRET) ------------------------------------------------------
SECRET = b"0123456789abcdef-registry-test"


def test_signed_entries_round_trip_and_read_without_secret(clean_redis):
    reg = Registry(clean_redis, secret=SECRET)
    info = InstanceInfo("dec-0", ["decode"], "tcp://127.0.0.1:2", load={"free_blocks": 7.0}, incarnation="a1",
                        draining=True, restarts=2)
    reg.put_instance(info, 5)
    entry = FeatureEntry("enc-0", "shm://x/1/2", 256, 1024, "float32", [4, 64], [1, 4, 4])
    reg.put_feature("abc", entry, ttl_s=5)
    raw = json.loads(redis.Redis.from_url(clean_redis).get("epd:inst:dec-0"))
    assert set(raw) == {"v", "exp", "sig"} and raw["v"]["instance_id"] == "dec-0" and len(raw["sig"]) == 64
    assert reg.instances() == [info]
    assert reg.get_feature("abc") == entry
    plain = Registry(clean_redis)  # no secret: reads either form, checks nothing
    assert plain.instances() == [info] and plain.get_feature("abc") == entry


def test_signed_reader_skips_forged_copied_and_foreign_entries(clean_redis, caplog):
    reg = Registry(clean_redis, secret=SECRET)
    r = redis.Redis.from_url(clean_redis)
    reg.put_instance(InstanceInfo("dec-0", ["decode"], "tcp://127.0.0.1:2"), 5)
    Registry(clean_redis).put_instance(InstanceInfo("evil", ["decode"], "tcp://10.6.6.6:1"), 5)  # unsigned
    r.set("epd:inst:copy", r.get("epd:inst:dec-0"))  # a valid entry under another key
    Registry(clean_redis, secret=b"another-secret-of-16+bytes").put_instance(
        InstanceInfo("other", ["decode"], "tcp://127.0.0.1:3"), 5)
    tampered = json.loads(r.get("epd:inst:dec-0"))
    tampered["v"]["inbox"] = "tcp://10.6.6.6:2"
    r.set("epd:inst:tampered", json.dumps(tampered))
    stale = reg._encode("epd:inst:stale", asdict(InstanceInfo("stale", ["decode"], "tcp://x:1")), ttl_s=-120)
    r.set("epd:inst:stale", stale)  # a signed entry written back long after it expired
    with caplog.at_level(logging.WARNING, logger="epd.registry.registry"):
        assert [i.instance_id for i in reg.instances()] == ["dec-0"]
        assert [i.instance_id for i in reg.instances("decode")] == ["dec-0"]  # second look: no new warnings
    warned = sorted(rec.args[0] for rec in caplog.records)
    assert warned == ["epd:inst:copy", "epd:inst:evil", "epd:inst:other", "epd:inst:stale", "epd:inst:tampered"]
    assert "epd:inst:evil ignored: unsigned" in caplog.text
    assert "epd:inst:stale ignored: signature expired" in caplog.text

    entry = FeatureEntry("enc-0", "shm://x/1/2", 256, 1024, "float32", [4, 64], [1, 4, 4])
    Registry(clean_redis).put_feature("forged", entry, ttl_s=5)
    assert reg.get_feature("forged") is None
    reg.delete_feature("forged", holder="enc-0")  # an untrusted entry is not "held" by anyone
    assert r.exists("epd:mm:forged")


# -- Redis with a password (EPD_REDIS_URL=redis://[user]:pass@host:port/db) --------------------
@pytest.fixture()
def password_redis(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [_redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--requirepass", "s3cret-pass"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password="s3cret-pass")
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_password_in_url(password_redis):
    port = password_redis
    assert redact_url(f"redis://:s3cret-pass@127.0.0.1:{port}/0") == f"redis://:***@127.0.0.1:{port}/0"
    assert redact_url("redis://u:p@[::1]:6379/2") == "redis://u:***@[::1]:6379/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    for url in (f"redis://:s3cret-pass@127.0.0.1:{port}/0", f"redis://default:s3cret-pass@127.0.0.1:{port}/0"):
        reg = Registry(url, secret=SECRET)
        reg.ping()
        reg.put_instance(InstanceInfo("enc-0", ["encoder"], "tcp://127.0.0.1:1"), 5)
        assert [i.instance_id for i in reg.instances()] == ["enc-0"]
    for url in (f"redis://127.0.0.1:{port}/0", f"redis://:wrong-pass@127.0.0.1:{port}/0"):
        reg = Registry(url)
        with pytest.raises(RegistryError) as err:
            reg.ping()
        assert "s3cret" not in str(err.value) and "wrong-pass" not in str(err.value)  # no password in messages
        with pytest.raises(RegistryError):
            reg.instances()
        with pytest.raises(RegistryError):
            reg.put_instance(InstanceInfo("x", ["decode"], "tcp://x:1"), 5)
