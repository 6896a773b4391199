"""Regularisation options do what they say: locked (variational) dropout shares one mask across
time steps, weight drop resamples per batch and is off in eval (every cell), word dropout drops
every occurrence of a word, AR/TAR add the stated penalties, weight averaging averages and is what
validation, checkpoints and export see, the timed schedule decays with the clock, and exported
graphs contain none of it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import torch.nn.functional as F  # noqa: E402

import training.model as M  # noqa: E402
from nextword.text import SPECIAL_TOKENS  # noqa: E402
from nextword.vocab import Vocab  # noqa: E402
from training.averaging import WeightAverage  # noqa: E402
from training.cli import build_parser  # noqa: E402
from training.export import PARITY_TOLERANCE, export_model  # noqa: E402
from training.model import CELLS, LanguageModel, ModelConfig, sequence_dropout  # noqa: E402
from training.train import TrainConfig, _lr_lambda, activation_penalties, train, train_config_from_args  # noqa: E402

V, E, H, B, T = 30, 6, 6, 5, 9
# (cell, zoneout): every cell, and the zoneout variants that use the stepped implementation
VARIANTS = [(c, 0.0) for c in CELLS] + [("lstm", 0.2), ("gru", 0.2)]


def _id(v: tuple[str, float]) -> str:
    return f"{v[0]}{'-zoneout' if v[1] else ''}"


def make(cell: str = "lstm", zoneout: float = 0.0, layers: int = 2, seed: int = 0, **reg) -> LanguageModel:
    settings = {"dropout_embedding": 0.0, "dropout": 0.0, "dropout_output": 0.0, **reg}
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(vocab_size=V, cell=cell, embedding_size=E, hidden_size=H, num_layers=layers,
                                     zoneout=zoneout, **settings))


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, V, size=(B, T)))


def zero_pattern_shared_over_time(y: torch.Tensor) -> bool:
    zeros = y == 0
    return bool(zeros.any()) and bool((zeros == zeros[:, :1]).all())


def test_sequence_dropout_locked_shares_mask_across_time() -> None:
    x = torch.ones(8, 20, 16)
    torch.manual_seed(0)
    locked = sequence_dropout(x, 0.5, True, locked=True)
    assert zero_pattern_shared_over_time(locked)
    assert set(locked.unique().tolist()) == {0.0, 2.0}  # inverted scaling 1 / (1 - p)
    assert not (locked == locked[0:1, :1]).all()  # sequences of the batch have their own masks
    plain = sequence_dropout(x, 0.5, True, locked=False)
    assert not zero_pattern_shared_over_time(plain)
    assert torch.equal(sequence_dropout(x, 0.5, False, locked=True), x)


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_locked_dropout_in_the_model(variant, monkeypatch) -> None:
    """Input, between-layer and output dropout each draw one mask per sequence for every cell."""
    seen: list[torch.Tensor] = []
    real = M.sequence_dropout

    def record(x, p, training, locked):
        y = real(x, p, training, locked)
        if p and training:
            seen.append(y)
        return y

    monkeypatch.setattr(M, "sequence_dropout", record)
    model = make(*variant, dropout_embedding=0.4, dropout=0.4, dropout_output=0.4, locked_dropout=True).train()
    # a non-zero initial state: zoneout may keep a unit's initial value, which must not read as dropped
    model.features(tokens(), tuple(torch.randn_like(s) for s in model.initial_state(B)))
    assert len(seen) == 3  # embedding, between the two layers, output
    assert all(zero_pattern_shared_over_time(y) for y in seen)
    seen.clear()
    model.eval()(tokens(), model.initial_state(B))
    assert not seen


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_weight_drop_resamples_per_batch_and_is_off_in_eval(variant, monkeypatch) -> None:
    cell, zoneout = variant
    model = make(cell, zoneout, weight_drop=0.5)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    x, state = tokens(), model.initial_state(B)
    dropped: list[torch.Tensor] = []
    real = F.dropout

    def record(w, p=0.5, training=True, inplace=False):
        out = real(w, p, training, inplace)
        if w.dim() == 2 and w.shape[1] == H and w.shape[0] == model.cfg.gates * H:
            dropped.append(out)
        return out

    monkeypatch.setattr(F, "dropout", record)
    model.train()
    a, _ = model.features(x, state)
    assert len(dropped) == 2  # one mask per layer per batch (not per time step)
    assert all(((w == 0).float().mean() > 0.2) for w in dropped)
    b, _ = model.features(x, state)
    assert not torch.allclose(a, b)  # a fresh mask for the next batch
    a.sum().backward()
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())  # parameters untouched
    names = {M.HighwayLSTM: "layers.0.weight_hh_l0", M.NativeRecurrent: "net.weight_hh_l0"}
    name = names.get(type(model.recurrent), "weight_hh_l0")
    assert model.recurrent.get_parameter(name).grad.abs().sum() > 0  # gradients reach the raw weights
    dropped.clear()
    model.eval()
    with torch.no_grad():
        lp, st = model(x, state)
        plain = make(cell, zoneout)
        plain.load_state_dict(model.state_dict())
        lp0, st0 = plain.eval()(x, state)
    assert not dropped
    assert torch.equal(lp, lp0) and all(torch.equal(s, s0) for s, s0 in zip(st, st0, strict=True))


def test_weight_drop_zero_is_the_plain_model() -> None:
    x = tokens()
    a = make("lstm", weight_drop=0.0).train().features(x, make().initial_state(B))[0]
    b = make("lstm").train().features(x, make().initial_state(B))[0]
    assert torch.equal(a, b)


def test_word_dropout_drops_every_occurrence_of_a_word(monkeypatch) -> None:
    inputs: list[torch.Tensor] = []
    model = make(dropout_words=0.5).train()
    model.recurrent.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    x = tokens()
    torch.manual_seed(3)
    model.features(x, model.initial_state(B))
    emb = model.embedding(x).detach()
    got = inputs[0].detach()
    dropped = (got == 0).all(-1)
    assert dropped.any() and not dropped.all()
    for word in x.unique():
        where = x == word
        assert dropped[where].all() or not dropped[where].any()  # all occurrences or none
    torch.testing.assert_close(got[~dropped], emb[~dropped] * 2.0)  # survivors scaled by 1 / (1 - p)
    inputs.clear()
    model.eval()(x, model.initial_state(B))
    torch.testing.assert_close(inputs[0], model.embedding(x))


def test_activation_penalties() -> None:
    cfg = TrainConfig(corpus="-", out_dir="-", ar=2.0, tar=3.0)
    feats, hidden = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    ar, tar = activation_penalties(cfg, feats, hidden)
    torch.testing.assert_close(ar, 2.0 * (feats**2).mean())
    torch.testing.assert_close(tar, 3.0 * ((hidden[:, 1:] - hidden[:, :-1]) ** 2).mean())
    off = activation_penalties(replace(cfg, ar=0.0, tar=0.0), feats, hidden)
    assert float(off[0]) == 0.0 and float(off[1]) == 0.0


def test_weight_average_uniform_and_ema() -> None:
    model = make(layers=1)
    snapshots = []
    uniform, ema = WeightAverage("uniform"), WeightAverage("ema", ema_decay=0.9)
    with torch.no_grad():
        for k in range(4):
            for p in model.parameters():
                p.add_(float(k + 1))
            snapshots.append({n: p.clone() for n, p in model.named_parameters()})
            uniform.update(model)
            ema.update(model)
    for name, _ in model.named_parameters():
        torch.testing.assert_close(uniform.params[name], torch.stack([s[name] for s in snapshots]).mean(0))
        expect = snapshots[0][name]
        for s in snapshots[1:]:
            expect = 0.9 * expect + 0.1 * s[name]
        torch.testing.assert_close(ema.params[name], expect)
    current = {n: p.clone() for n, p in model.named_parameters()}
    with uniform.applied(model):
        torch.testing.assert_close(model.embedding.weight, uniform.params["embedding.weight"])
        assert model.decoder.weight is model.embedding.weight  # still tied
    assert all(torch.equal(current[n], p) for n, p in model.named_parameters())  # raw weights back


def test_lr_follows_the_clock_in_a_timed_run() -> None:
    cfg = TrainConfig(corpus="-", out_dir="-", warmup_steps=2, min_lr_ratio=0.1)
    clock = {"progress": 0.0}
    fn = _lr_lambda(cfg, total_steps=1000, clock=clock)
    assert fn(10) > 0.99
    clock["progress"] = 0.5
    assert abs(fn(10) - (0.1 + 0.9 * 0.5)) < 1e-9  # cosine midpoint although steps barely started
    clock["progress"] = 2.0
    assert abs(fn(10) - 0.1) < 1e-9
    assert abs(_lr_lambda(cfg, total_steps=1000)(10) - fn(10)) > 0.5  # without a clock: steps only


def test_cli_options_reach_the_configs() -> None:
    args = build_parser().parse_args(
        ["train", "--out", "x", "--locked-dropout", "--dropout-words", "0.1", "--weight-drop", "0.3", "--ar", "2",
         "--tar", "1", "--average", "ema", "--average-start", "0.6", "--ema-decay", "0.99", "--time-schedule",
         "--time-limit-minutes", "5"]
    )
    cfg = train_config_from_args(args)
    assert cfg.model["locked_dropout"] and cfg.model["dropout_words"] == 0.1 and cfg.model["weight_drop"] == 0.3
    assert (cfg.ar, cfg.tar, cfg.average, cfg.average_start, cfg.ema_decay, cfg.time_schedule) == (
        2.0, 1.0, "ema", 0.6, 0.99, True)
    ModelConfig(vocab_size=10, **cfg.model)
    with pytest.raises(ValueError, match="weight_drop"):
        ModelConfig(vocab_size=10, weight_drop=1.0)


def _sentences(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    nouns, verbs = "cat dog bird fish man".split(), "sees likes eats".split()
    return "".join(f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)} .\n" for _ in range(n))


def test_training_with_every_option(tmp_path: Path) -> None:
    """A run with every option: the log records the AR/TAR terms and the averaging switch,
    validation and best.pt use the averaged weights, resume continues from the raw ones, the
    plot draws it all, and export keeps torch/onnxruntime parity with no dropout in the graphs."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        (corpus / f"tiny.{split}.txt").write_text(_sentences(n, len(split)))
    model = {"cell": "lstm", "embedding_size": 12, "hidden_size": 12, "num_layers": 2, "locked_dropout": True,
             "dropout_words": 0.1, "weight_drop": 0.3}
    cfg = TrainConfig(corpus=str(corpus), out_dir=str(tmp_path / "run"), corpus_format="ptb", batch_size=8, bptt=10,
                      epochs=2, lr=1e-2, warmup_steps=5, log_every=5, threads=1, ar=1.0, tar=1.0, average="ema",
                      average_start=0.6, ema_decay=0.9, model=model)
    summary = train(cfg)
    out = Path(cfg.out_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert all({"ar", "tar", "averaging"} <= r.keys() for r in steps)
    assert all(r["ar"] > 0 and r["tar"] > 0 for r in steps)
    assert not steps[0]["averaging"] and steps[-1]["averaging"]
    valid = [r for r in records if r["event"] == "valid"]
    assert [r["averaged"] for r in valid] == [False, True] and valid[1]["average_steps"] > 0
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    avg = last["average"]["params"]
    assert torch.equal(last["model"]["embedding.weight"], avg["embedding.weight"])
    assert not torch.equal(last["train_model"]["embedding.weight"], avg["embedding.weight"])
    resumed = train(replace(cfg, epochs=3), resume=True)
    assert resumed["steps"] == summary["steps"] * 3 // 2

    from training.plot import plot_run

    assert plot_run(out, tmp_path / "curves.png").stat().st_size > 10_000

    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    lm = LanguageModel(ModelConfig(**best["model_config"]))
    lm.load_state_dict(best["model"])
    target = export_model(lm, Vocab.load(out / "vocab.txt"), tmp_path / "models", "reg", 1)
    card = json.loads((target / "model.json").read_text())
    assert max(card["export"]["parity_max_abs"].values()) <= PARITY_TOLERANCE


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_exported_graphs_hold_no_regularisation(variant, tmp_path: Path) -> None:
    import onnx

    model = make(*variant, seed=1, dropout_embedding=0.3, dropout=0.3, dropout_output=0.3, locked_dropout=True,
                 dropout_words=0.2, weight_drop=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    vocab = Vocab([*SPECIAL_TOKENS, *(f"w{i}" for i in range(V - 2))])
    target = export_model(model.train(), vocab, tmp_path, "m", 1)  # export must switch to eval itself
    card = json.loads((target / "model.json").read_text())
    assert max(card["export"]["parity_max_abs"].values()) <= PARITY_TOLERANCE
    for graph in ("predict.onnx", "score.onnx"):
        proto = onnx.load(str(target / graph), load_external_data=False)
        ops = {n.op_type for n in proto.graph.node}
        for g in [a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]:
            ops |= {n.op_type for n in g.node}
        assert not ops & {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
                          "Bernoulli", "Multinomial"}, ops
