"""epd.elastic: the policy's decisions (scale up/down within the bounds, switches with their
guards and cooldown, refusals logged once) and the controller's actions on a fake supervisor
against a real Redis registry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from epd import elastic
from epd.config import ConfigError, ElasticConfig
from epd.elastic import ElasticController, ElasticPolicy, Policy, Snapshot, policy_from_config, snapshot
from epd.registry.controller_state import get_controller_state
from epd.registry.registry import InstanceInfo, Registry
from epd.supervisor import ProcessSpec, ProcessStatus


def snap(at, enc=("encoder-0",), pre=("prefill-0",), dec=("decode-0",), eq=0.0, pq=0.0, dl=0.0):
    return Snapshot(at, tuple(enc), tuple(pre), tuple(dec), eq, pq, dl)


def kinds(actions):
    return [(a.kind, a.role, a.to_role) for a in actions]


def test_scale_up_needs_a_full_window_and_stops_at_the_max():
    p = Policy(ElasticPolicy(encoders_min=1, encoders_max=2, scale_up_queue=4, window=3, switch=False))
    assert p.decide(snap(0, eq=10)) == [] and p.decide(snap(1, eq=10)) == []
    assert kinds(p.decide(snap(2, eq=10))) == [("scale_up", "encoder", "")]
    assert p.decide(snap(3, eq=10), pending_encoders=1) == []  # one start at a time
    two = ("encoder-0", "encoder-1")
    refused = p.decide(snap(4, enc=two, eq=40))
    assert kinds(refused) == [("refused", "encoder", "")]
    assert "EPD_ENCODERS_MAX=2 reached: stays at 2" in refused[0].reason
    assert p.decide(snap(5, enc=two, eq=40)) == []  # reported once, not every period
    assert p.decide(snap(6, enc=two, eq=0)) == []
    p.decide(snap(7, enc=two, eq=0))
    p.decide(snap(8, enc=two, eq=0))
    assert p.decide(snap(9, enc=two, eq=80)) == []  # the window's mean is over 4 again: still quiet
    assert p.decide(snap(30, enc=two, eq=80)) == []
    assert kinds(p.decide(snap(64, enc=two, eq=80))) == [("refused", "encoder", "")]  # again after 60 s


def test_scale_down_after_idle_time_never_below_the_min():
    p = Policy(ElasticPolicy(encoders_min=1, encoders_max=3, scale_down_idle_s=10, window=1, switch=False))
    two = ("encoder-0", "encoder-1")
    assert p.decide(snap(0, enc=two)) == []
    assert p.decide(snap(5, enc=two)) == []
    assert p.decide(snap(7, enc=two, eq=1)) == []  # work arrived: the idle clock restarts
    assert p.decide(snap(8, enc=two)) == []
    assert kinds(p.decide(snap(18, enc=two))) == [("scale_down", "encoder", "")]
    assert p.decide(snap(40)) == []  # at the min
    three = ("encoder-0", "encoder-1", "encoder-2")
    assert p.decide(snap(60, enc=two)) == []  # a new encoder registered: a full idle window again
    assert p.decide(snap(69, enc=two)) == []
    assert kinds(p.decide(snap(70, enc=two))) == [("scale_down", "encoder", "")]
    assert p.decide(snap(71, enc=three)) == [] and p.decide(snap(80, enc=three)) == []


def test_counts_outside_the_bounds_are_brought_inside():
    p = Policy(ElasticPolicy(encoders_min=2, encoders_max=3, switch=False))
    assert kinds(p.decide(snap(0))) == [("scale_up", "encoder", "")]
    assert p.decide(snap(1), pending_encoders=1) == []
    four = tuple(f"encoder-{i}" for i in range(4))
    assert kinds(p.decide(snap(2, enc=four))) == [("scale_down", "encoder", "")]


def test_switches_with_guards_and_cooldown():
    cfg = ElasticPolicy(decode_high=8, decode_low=2, prefill_high=4, prefill_low=0.5, cooldown_s=10, window=2)
    p = Policy(cfg)
    two_p = ("prefill-0", "prefill-1")
    assert p.decide(snap(0, pre=two_p, dl=20)) == []
    assert kinds(p.decide(snap(1, pre=two_p, dl=20))) == [("switch", "prefill", "decode")]
    p.switched(1)
    p.decide(snap(2, dec=("decode-0", "prefill-1-as-decode"), pq=0, dl=40))
    assert p.decide(snap(3, dec=("decode-0", "prefill-1-as-decode"), pq=0, dl=40)) == []  # cooldown
    # one prefill left: refused, logged once
    out = p.decide(snap(12, dec=("decode-0", "prefill-1-as-decode"), dl=40))
    assert kinds(out) == [("refused", "switch", "")] and "would leave no prefill" in out[0].reason
    assert p.decide(snap(13, dec=("decode-0", "prefill-1-as-decode"), dl=40)) == []
    # the mirror: prefill crowded, decode idle, two decodes
    q = Policy(cfg)
    two_d = ("decode-0", "decode-1")
    q.decide(snap(0, dec=two_d, pq=10, dl=1))
    assert kinds(q.decide(snap(1, dec=two_d, pq=10, dl=1))) == [("switch", "decode", "prefill")]
    # busy both ways: no switch
    r = Policy(cfg)
    r.decide(snap(0, pre=two_p, pq=10, dl=20))
    assert r.decide(snap(1, pre=two_p, pq=10, dl=20)) == []


def test_bad_bounds_and_thresholds_are_configuration_errors():
    with pytest.raises(ConfigError, match="EPD_ENCODERS_MIN=3 must be ≤ EPD_ENCODERS_MAX=2"):
        policy_from_config(ElasticConfig(encoders_min=3, encoders_max=2), 1)
    with pytest.raises(ConfigError, match="LOW must be below"):
        policy_from_config(ElasticConfig(switch_decode_low=9, switch_decode_high=8), 1)
    pol = policy_from_config(ElasticConfig(encoders_max=4), 2)
    assert (pol.encoders_min, pol.encoders_max) == (2, 4)
    assert policy_from_config(ElasticConfig(), 1).encoders_max == 1


def test_snapshot_sums_queues_of_serving_single_role_instances():
    infos = [
        InstanceInfo("encoder-0", ["encoder"], "tcp://a", load={"queued_images": 3}),
        InstanceInfo("encoder-1", ["encoder"], "tcp://b", load={"queued_images": 2}, draining=True),
        InstanceInfo("ep-0-encoder", ["encoder", "prefill"], "tcp://c", load={"queued_images": 9}),
        InstanceInfo("prefill-0", ["prefill"], "tcp://d", load={"queued_requests": 4}),
        InstanceInfo("decode-0", ["decode"], "tcp://e", load={"running": 5, "queued": 2, "free_blocks": 9}),
    ]
    s = snapshot(infos, 1.0)
    assert (s.encoders, s.prefills, s.decodes) == (("encoder-0",), ("prefill-0",), ("decode-0",))
    assert (s.encoder_queue, s.prefill_queue, s.decode_load) == (3, 4, 7)


class FakeSupervisor:
    def __init__(self, names):
        self.procs = {n: "running" for n in names}
        self.lines, self.added, self.retired, self.specs = [], [], [], {}

    def processes(self):
        return [ProcessStatus(n, 1, s, 0, None) for n, s in self.procs.items()]

    def add(self, spec):
        self.added.append(spec.name)
        self.procs[spec.name] = "running"

    def retire(self, name):
        self.retired.append(name)
        self.procs[name] = "retired"

    def set_spec(self, name, spec):
        self.specs[name] = spec

    def say(self, line):
        self.lines.append(line)


def spec_for(name, role, instance_id):
    return ProcessSpec(name, f"exec python -m services.{role}", {"EPD_INSTANCE_ID": instance_id})


def test_controller_scales_switches_and_publishes(clean_redis, monkeypatch):
    reg = Registry(clean_redis)
    put = lambda iid, role, **load: reg.put_instance(  # noqa: E731
        InstanceInfo(iid, [role], f"tcp://{iid}", admin=f"{iid}:1", load=load), 30)
    put("encoder-0", "encoder", queued_images=12)
    put("prefill-0", "prefill", queued_requests=0)
    put("prefill-1", "prefill", queued_requests=0)
    put("decode-0", "decode", running=12, queued=3)
    sup = FakeSupervisor(["encoder-0", "prefill-0", "prefill-1", "decode-0", "gateway"])
    calls = []

    def fake_switch(address, from_role, to_role, drain_timeout_s, timeout_s, token):
        calls.append((address, from_role, to_role, drain_timeout_s))
        return SimpleNamespace(ok=True, message="", instance_id="prefill-0-as-decode", offload_s=0.5,
                               migrate_s=0.1, onload_s=0.01, weights_reused=True)

    monkeypatch.setattr("epd.admin.switch_role", fake_switch)
    pol = ElasticPolicy(encoders_min=1, encoders_max=2, window=1, decode_high=8, prefill_low=0.5)
    ctl = ElasticController(pol, reg, sup, spec_for, period_s=1, switch_drain_s=1.5)
    acts = ctl.tick(now=100.0)
    assert kinds(acts) == [("scale_up", "encoder", ""), ("switch", "prefill", "decode")]
    assert sup.added == ["encoder-1"] and "encoder-1" in ctl.pending
    assert calls == [("prefill-0:1", "prefill", "decode", 1.5)]  # the least loaded, by id on ties
    assert sup.specs["prefill-0"].env["EPD_INSTANCE_ID"] == "prefill-0-as-decode"
    assert any("is now prefill-0-as-decode (decode)" in line for line in sup.lines)
    state = get_controller_state(reg)
    assert state.actions == {"scale_up:encoder": 1, "switch:prefill>decode": 1}
    assert state.last_switch["migrate"] == 0.1 and state.switches == 1
    assert state.targets["encoder"] == 2
    # still high with encoder-1 pending: no second start; registered, at the max: refused once
    assert kinds(ctl.tick(now=101.0)) == []
    put("encoder-1", "encoder", queued_images=12)
    out = ctl.tick(now=102.0)
    assert kinds(out) == [("refused", "encoder", "")] and not ctl.pending
    # idle for long enough: the newest encoder is retired
    put("encoder-0", "encoder", queued_images=0)
    put("encoder-1", "encoder", queued_images=0)
    pol2 = ElasticPolicy(encoders_min=1, encoders_max=2, window=1, scale_down_idle_s=5, switch=False)
    ctl.policy = Policy(pol2)
    ctl.tick(now=110.0)
    assert kinds(ctl.tick(now=116.0)) == [("scale_down", "encoder", "")] and sup.retired == ["encoder-1"]
    assert get_controller_state(reg).actions["scale_down:encoder"] == 1


def test_process_name_of_switched_instances():
    assert elastic.process_name("prefill-1-as-decode") == "prefill-1"
    assert elastic.process_name("decode-0") == "decode-0"


def test_spec_factory_copies_a_started_process_of_the_role(tmp_path):
    specs = [
        ProcessSpec("encoder-0", "exec /py -m services.encoder", {"EPD_INSTANCE_ID": "encoder-0",
                    "EPD_TORCH_THREADS": "2", "EPD_MODEL": "/m"}, "/root", str(tmp_path / "encoder-0.log")),
        ProcessSpec("ep-0", "exec /py -m services", {"EPD_INSTANCE_ID": "ep-0", "EPD_ROLES": "encoder,prefill",
                    "EPD_TORCH_THREADS": "1"}, "/root"),
        ProcessSpec("prefill-0", "exec /py -m services.prefill", {"EPD_INSTANCE_ID": "prefill-0",
                    "EPD_TORCH_THREADS": "1", "EPD_MODEL": "/m"}, "/root"),
        ProcessSpec("gateway", "exec /py -m services.gateway", {"EPD_INSTANCE_ID": "gateway"}, "/root"),
    ]
    spec_for = elastic.spec_factory(specs)
    enc = spec_for("encoder-1", "encoder", "encoder-1")
    assert enc.command == "exec /py -m services.encoder" and enc.cwd == "/root"
    assert enc.env["EPD_INSTANCE_ID"] == "encoder-1" and enc.env["EPD_TORCH_THREADS"] == "2"
    assert enc.log_file == str(tmp_path / "encoder-1.log")
    dec = spec_for("prefill-0", "decode", "prefill-0-as-decode")
    assert dec.command == "exec /py -m services.decode" and "EPD_ROLES" not in dec.env
    assert dec.env["EPD_INSTANCE_ID"] == "prefill-0-as-decode" and dec.env["EPD_MODEL"] == "/m"
