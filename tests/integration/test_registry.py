import time

import pytest

from epd.registry.registry import FeatureEntry, Heartbeat, InstanceInfo, Registry, RegistryError


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
    from tests.conftest import free_port

    reg = Registry(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RegistryError):
        reg.ping()
    with pytest.raises(RegistryError):
        reg.instances()
