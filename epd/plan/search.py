"""``epd plan``'s search: the deployment with the highest simulated goodput on a device budget.

The space (:class:`SearchSpace`): topology shape (``E-P-D``, ``EP-D``, ``E-PD``, ``EPD``,
``(E-P)-D`` — i.e. which roles are co-located), instances per role (every way to spend the N
devices), the encoder's image budget, prefill's token budget, the KV layer group, decode's
batch limit and the gateway's routing policy.

Goodput is the EPD paper's (§5.1): the highest request rate at which at least ``target`` of
the requests meet both SLOs. :func:`goodput` finds it on the simulator by bracketing the
crossing (start from the analytic capacity of the busiest stage, double or halve) and then
bisecting the rate to ``rel_tol``; the workload's arrivals scale with the rate (same seed, as
``epd bench serve`` draws them), so attainment falls with rate and the crossing is well defined.
Each run is made to last at least 5 × the TTFT SLO (the workload cycled): a burst shorter than
the SLO drains within it at any rate, which would rank configurations by their burst capacity.

Search: Optuna's TPE sampler (the EPD paper used Bayesian optimisation, §3.2.3) over
categorical parameters, one trial = one configuration's goodput, warm-started with every
instance split at the default limits (:func:`warm_start`, up to half the trials); or, on small
spaces, every configuration (``exhaustive``), which is how the tests check that the two agree.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

from epd.bench.metrics import meets_slo
from epd.plan.deployment import SHAPES, Deployment, DeploymentError, Limits, notation
from epd.plan.profile import Profile, decode_x, encode_x, image_decode_x, prefill_x
from epd.plan.sim import simulate
from epd.plan.workload import SimWorkload

logger = logging.getLogger(__name__)

SHAPE_PARTS = {"E-P-D": 3, "EP-D": 2, "E-PD": 2, "EPD": 1, "(E-P)-D": 2}


@dataclass(frozen=True)
class Config:
    """One point of the search space."""

    shape: str
    counts: tuple[int, ...]
    encoder_max_images: int = 8
    prefill_max_tokens: int = 4096
    kv_layer_group: int = 2
    decode_max_batch: int = 64
    routing: str = "least-loaded"

    @property
    def topology(self) -> str:
        return notation(self.shape, self.counts)

    def deployment(self, base: Limits, cores: int | None = None, ep_coupled: bool = False) -> Deployment:
        limits = Limits(**{**base.__dict__, "encoder_max_images": self.encoder_max_images,
                           "prefill_max_tokens": self.prefill_max_tokens, "kv_layer_group": self.kv_layer_group,
                           "decode_max_batch": self.decode_max_batch})
        return Deployment(self.topology, limits, self.routing, cores=cores, ep_coupled=ep_coupled)


@dataclass
class SearchSpace:
    """What the search varies (each a list of choices) on a budget of ``devices``."""

    devices: int
    shapes: tuple[str, ...] = SHAPES
    encoder_max_images: tuple[int, ...] = (1, 2, 4, 8, 16)
    prefill_max_tokens: tuple[int, ...] = (2048, 4096, 8192, 16384)
    kv_layer_group: tuple[int, ...] = (0, 1, 2, 4)
    decode_max_batch: tuple[int, ...] = (16, 32, 64, 128, 256)
    routing: tuple[str, ...] = ("least-loaded", "round-robin")
    base: Limits = field(default_factory=Limits)
    cores: int | None = None
    ep_coupled: bool = False  # EP processes as the papers' coupled baseline engine (Deployment.ep_coupled)

    @classmethod
    def default(cls, prof: Profile, devices: int, shapes: list[str], cores: int | None = None,
                kv_memory_mb: int = 256, ep_coupled: bool = False) -> SearchSpace:
        """The default space for ``prof``: layer groups up to the model's layers.

        Raises:
            DeploymentError: an unknown shape, or no shape that fits ``devices``.
        """
        shapes = [s.strip() for s in shapes if s.strip()]
        bad = [s for s in shapes if s not in SHAPE_PARTS]
        if bad:
            raise DeploymentError(f"--shapes: unknown {', '.join(bad)} (expected some of {', '.join(SHAPES)})")
        fit = tuple(s for s in shapes if SHAPE_PARTS[s] <= devices)
        if not fit:
            raise DeploymentError(f"--devices {devices}: too few for any of {', '.join(shapes)}")
        layers = prof.model["num_layers"]
        groups = tuple(g for g in (0, 1, 2, 4, 7, 14) if g <= layers)
        return cls(devices, fit, kv_layer_group=groups, base=Limits(kv_memory_mb=kv_memory_mb), cores=cores,
                   ep_coupled=ep_coupled)

    def counts(self, shape: str) -> list[tuple[int, ...]]:
        """Every instance count tuple of ``shape`` that uses exactly ``devices`` devices."""
        k = SHAPE_PARTS[shape]
        if k == 1:
            return [(self.devices,)]
        return [c for c in itertools.product(range(1, self.devices), repeat=k) if sum(c) == self.devices]

    def configs(self):
        """Every configuration (exhaustive search)."""
        for shape in self.shapes:
            for counts in self.counts(shape):
                for emi, pmt, g, dmb, rt in itertools.product(self.encoder_max_images, self.prefill_max_tokens,
                                                              self.kv_layer_group, self.decode_max_batch,
                                                              self.routing):
                    yield Config(shape, counts, emi, pmt, g, dmb, rt)

    def size(self) -> int:
        per = (len(self.encoder_max_images) * len(self.prefill_max_tokens) * len(self.kv_layer_group)
               * len(self.decode_max_batch) * len(self.routing))
        return per * sum(len(self.counts(s)) for s in self.shapes)


@dataclass
class Evaluated:
    """A configuration with its predicted goodput (req/s; 0 when even the lowest rate misses).

    Attributes:
        how: ``interpolated`` (crossing bracketed), ``lower-bound`` (met at the highest rate tried),
            ``below-range``.
        points: ``(rate, attainment)`` of every simulation run for it.
    """

    config: Config
    deployment: Deployment
    goodput: float
    how: str
    points: list[tuple[float, float]] = field(default_factory=list)


MAX_REQUESTS = 6000  # cap of one simulated run in the search (min_duration_s × rate may ask for more)


def attainment(prof: Profile, dep: Deployment, workload: SimWorkload, slo: dict[str, float], rate: float,
               min_duration_s: float = 0.0) -> float:
    """Fraction of the requests meeting every SLO at ``rate`` (simulated).

    With ``min_duration_s`` the workload is cycled until its arrivals span at least that long, so
    that a high rate is not judged on a burst shorter than the TTFT SLO (a finite workload's
    backlog then drains within the SLO and every rate looks sustainable).
    """
    if min_duration_s > 0 and math.isfinite(rate):
        workload = workload.extended(min(MAX_REQUESTS, math.ceil(rate * min_duration_s)))
    res = simulate(prof, dep, workload, rate)
    return sum(meets_slo(r, slo) for r in res.records) / max(1, len(res.records))


def capacity_guess(prof: Profile, dep: Deployment, workload: SimWorkload) -> float:
    """Requests/s the busiest stage could sustain with its instances busy all the time (a rough
    upper bound the goodput search starts from)."""
    kind = prof.device.get("kind", "cpu")
    cores = dep.cores or int(prof.device.get("cores", 1))
    placed = dep.place(kind, cores)
    reqs = workload.requests or []
    if not reqs:
        return 1.0

    def threads(role):
        ts = [p.threads for p in placed if role in p.roles]
        return (ts[0] if ts else 1), max(1, len(ts))

    te, ne = threads("encoder")
    tp, n_p = threads("prefill")
    td, nd = threads("decode")
    enc = sum(prof.cost("encode", te, encode_x([(im.patches, im.src_pixels)]))
              + prof.cost("image_decode", te, image_decode_x(im.src_pixels)) for r in reqs for im in r.images)
    pre = sum(prof.cost("prefill", tp, prefill_x([r.prompt_tokens], len(r.images))) for r in reqs)
    batch = min(dep.limits.decode_max_batch, 16)
    ctx = max(1, int(sum(r.prompt_tokens + r.max_tokens / 2 for r in reqs) / len(reqs)))
    dec = sum(r.max_tokens for r in reqs) * prof.cost("decode", td, decode_x(batch, ctx)) / batch
    per_req = max(enc / ne, pre / n_p, dec / nd) / len(reqs)
    if kind == "cpu":
        per_req = max(per_req, (enc + pre + dec) / len(reqs) / cores)
    return 1.0 / max(per_req, 1e-6)


def default_min_duration(slo: dict[str, float]) -> float:
    """Arrivals of a search run span at least 5 × the TTFT SLO (10 s without one)."""
    return 5 * slo["ttft"] / 1e3 if "ttft" in slo else 10.0


def goodput(prof: Profile, dep: Deployment, workload: SimWorkload, slo: dict[str, float], target: float = 0.9,
            rel_tol: float = 0.03, max_probes: int = 24,
            min_duration_s: float | None = None) -> tuple[float, str, list[tuple[float, float]]]:
    """The highest rate with attainment ≥ ``target`` (see the module docstring); each run's
    arrivals span at least ``min_duration_s`` (default :func:`default_min_duration`).

    Returns:
        ``(goodput, how, points)``; goodput is linearly interpolated between the last rate that
        met the target and the first that did not, as :func:`epd.bench.metrics.goodput_from_sweep`.
    """
    points: dict[float, float] = {}
    span = default_min_duration(slo) if min_duration_s is None else min_duration_s

    def att(r: float) -> float:
        if r not in points:
            points[r] = attainment(prof, dep, workload, slo, r, span)
        return points[r]

    hi = capacity_guess(prof, dep, workload)
    lo = None
    probes = 0
    if att(hi) >= target:
        lo = hi
        while probes < max_probes // 2:
            probes += 1
            hi *= 2
            if att(hi) < target:
                break
            lo = hi
        else:
            return lo, "lower-bound", sorted(points.items())
    else:
        r = hi
        while probes < max_probes // 2:
            probes += 1
            r /= 2
            if att(r) >= target:
                lo = r
                break
            hi = r
        if lo is None:
            return 0.0, "below-range", sorted(points.items())
    while hi - lo > rel_tol * lo and probes < max_probes:
        probes += 1
        mid = math.sqrt(lo * hi)
        if att(mid) >= target:
            lo = mid
        else:
            hi = mid
    a0, a1 = points[lo], points[hi]
    g = lo + (a0 - target) / (a0 - a1) * (hi - lo) if a0 != a1 else lo
    return g, "interpolated", sorted(points.items())


def evaluate(prof: Profile, space: SearchSpace, cfg: Config, workload: SimWorkload, slo: dict[str, float],
             target: float) -> Evaluated:
    dep = cfg.deployment(space.base, space.cores, space.ep_coupled)
    g, how, pts = goodput(prof, dep, workload, slo, target)
    return Evaluated(cfg, dep, g, how, pts)


def search(prof: Profile, space: SearchSpace, workload: SimWorkload, slo: dict[str, float], target: float = 0.9,
           trials: int = 60, exhaustive: bool = False, seed: int = 0, progress: bool = False) -> list[Evaluated]:
    """Every evaluated configuration, best first (ties: fewer KV groups, then notation order).

    With ``exhaustive`` every configuration of ``space`` is simulated; otherwise Optuna's
    ``TPESampler(seed=seed)`` proposes ``trials`` configurations (repeats are answered from a
    cache and not re-simulated).
    """
    seen: dict[Config, Evaluated] = {}

    def run(cfg: Config) -> float:
        if cfg not in seen:
            try:
                seen[cfg] = evaluate(prof, space, cfg, workload, slo, target)
            except DeploymentError as exc:  # a configuration the notation cannot express
                logger.warning("skipped %s: %s", cfg, exc)
                return 0.0
        return seen[cfg].goodput

    if exhaustive:
        configs = list(space.configs())
        bar = _bar(progress, len(configs), "exhaustive")
        for cfg in configs:
            run(cfg)
            bar.update(1)
        bar.close()
    else:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        for params in warm_start(space, trials // 2):
            study.enqueue_trial(params)
        bar = _bar(progress, trials, "optuna")

        def objective(trial: optuna.Trial) -> float:
            shape = trial.suggest_categorical("shape", list(space.shapes))
            options = [",".join(map(str, c)) for c in space.counts(shape)]
            counts = tuple(int(v) for v in trial.suggest_categorical(f"counts {shape}", options).split(","))
            cfg = Config(
                shape, counts,
                trial.suggest_categorical("encoder_max_images", list(space.encoder_max_images)),
                trial.suggest_categorical("prefill_max_tokens", list(space.prefill_max_tokens)),
                trial.suggest_categorical("kv_layer_group", list(space.kv_layer_group)),
                trial.suggest_categorical("decode_max_batch", list(space.decode_max_batch)),
                trial.suggest_categorical("routing", list(space.routing)),
            )
            value = run(cfg)
            bar.update(1)
            return value

        study.optimize(objective, n_trials=trials)
        bar.close()
    return rank(list(seen.values()))


def warm_start(space: SearchSpace, budget: int) -> list[dict]:
    """Optuna trials to enqueue first: every instance split of every shape at the default limits
    (evenly thinned to ``budget``) — the split matters most, and TPE then refines the limits."""
    d = Limits()

    def pick(choices, default):
        return default if default in choices else choices[len(choices) // 2]

    limits = {"encoder_max_images": pick(space.encoder_max_images, d.encoder_max_images),
              "prefill_max_tokens": pick(space.prefill_max_tokens, d.prefill_max_tokens),
              "kv_layer_group": pick(space.kv_layer_group, d.kv_layer_group),
              "decode_max_batch": pick(space.decode_max_batch, d.decode_max_batch),
              "routing": space.routing[0]}
    out = [{"shape": shape, f"counts {shape}": ",".join(map(str, c)), **limits}
           for shape in space.shapes for c in space.counts(shape)]
    if len(out) > budget > 0:
        step = len(out) / budget
        out = [out[int(i * step)] for i in range(budget)]
    return out if budget > 0 else []


def rank(found: list[Evaluated]) -> list[Evaluated]:
    """Best goodput first. Goodputs within 1 % of each other (below the bisection's resolution)
    tie; ties prefer the routing the gateway implements (least-loaded), then shape family order,
    notation and the limits."""
    order = {s: i for i, s in enumerate(SHAPES)}

    def bucket(g: float) -> int:
        return -round(math.log(g) / math.log(1.01)) if g > 0 else 0

    return sorted(found, key=lambda e: (bucket(e.goodput), e.config.routing != "least-loaded", -e.goodput,
                                        order.get(e.config.shape, 9), e.config.topology, repr(e.config)))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epd plan ({desc})", unit="config", dynamic_ncols=True)


def best_of_shape(found: list[Evaluated], shape: str) -> Evaluated | None:
    """The best evaluated configuration of one shape family (``None`` when none was tried)."""
    return next((e for e in found if e.config.shape == shape), None)
