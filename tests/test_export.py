"""ONNX export: every cell exported by ``training.export.export_model`` and checked independently
against torch with onnxruntime (ragged batches, stepwise state, padding, dynamic shapes, the score
graph), the native operators each cell maps onto, float16/int8 variants, and the artifact checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from nextword import artifact as A  # noqa: E402
from nextword.text import SPECIAL_TOKENS  # noqa: E402
from nextword.vocab import Vocab  # noqa: E402
from training.export import ExportError, export_model  # noqa: E402
from training.model import CELLS, LanguageModel, ModelConfig  # noqa: E402

E, H, V, L = 8, 12, 40, 2
TOL = 1e-4

# every cell tied and untied, and every zoneout cell (tied and untied alternately)
CONFIGS = [(cell, 0.0, tied) for cell in CELLS for tied in (True, False)] + [
    ("lstm", 0.25, True), ("peephole", 0.25, False), ("cifg", 0.25, True), ("gru", 0.25, False)
]


def _id(cfg: tuple[str, float, bool]) -> str:
    cell, zoneout, tied = cfg
    return f"{cell}{'-zoneout' if zoneout else ''}-{'tied' if tied else 'untied'}"


def tiny_vocab() -> Vocab:
    return Vocab([*SPECIAL_TOKENS, *(f"w{i}" for i in range(V - 2))])


def tiny_model(cell: str, zoneout: float = 0.0, tied: bool = True, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig(vocab_size=V, cell=cell, embedding_size=E, hidden_size=H, num_layers=L,
                                      tied=tied, zoneout=zoneout))
    with torch.no_grad():  # larger weights: distinct predictions, few near-ties in ranks
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Exported:
    def __init__(self, model: LanguageModel, path: Path) -> None:
        self.model, self.path = model, path
        self.card = A.read_card(path)
        self.predict = session(path / A.PREDICT_GRAPH)
        self.score = session(path / A.SCORE_GRAPH)

    @property
    def names(self) -> list[str]:
        return self.model.cfg.state_names

    def random_state(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        return {s: rng.normal(0, 0.5, (L, batch, H)).astype(np.float32) for s in self.names}

    def feeds(self, tokens: np.ndarray, lengths: np.ndarray, state: dict[str, np.ndarray]) -> dict:
        out = {A.TOKENS: tokens.astype(np.int64), A.LENGTHS: np.asarray(lengths, np.int64)}
        out.update({A.state_input(s): v for s, v in state.items()})
        return out

    def run_predict(self, tokens, lengths, state) -> tuple[np.ndarray, list[np.ndarray]]:
        lp, *new = self.predict.run(None, self.feeds(tokens, lengths, state))
        return lp, new

    def torch_row(self, ids: np.ndarray, state: dict[str, np.ndarray], row: int):
        """torch log-probs at every position [n, V] and final states for one unpadded row."""
        st = tuple(torch.from_numpy(state[s][:, row : row + 1].copy()) for s in self.names)
        with torch.no_grad():
            lp, new = self.model(torch.from_numpy(ids[None].astype(np.int64)), st)
        return lp[0].numpy(), [s[:, 0].numpy() for s in new]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("repo")
    cache: dict[tuple, Exported] = {}

    def get(cell: str, zoneout: float = 0.0, tied: bool = True) -> Exported:
        key = (cell, zoneout, tied)
        if key not in cache:
            model = tiny_model(cell, zoneout, tied, seed=len(cache))
            name = _id(key)
            path = export_model(model, tiny_vocab(), root, name, 1)
            cache[key] = Exported(model, path)
        return cache[key]

    return get


def ragged(rng: np.random.Generator, lengths: list[int], extra: int = 0) -> np.ndarray:
    """Right-padded tokens: valid ids in place, garbage (but in-range) ids in the padding."""
    return rng.integers(0, V, size=(len(lengths), max(lengths) + extra))


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_card_and_recorded_parity(exported, cfg) -> None:
    ex = exported(*cfg)
    card = json.loads((ex.path / A.CARD_FILE).read_text())
    cell, zoneout, tied = cfg
    assert card["format"] == A.FORMAT
    assert (card["cell"], card["zoneout"], card["tied"], card["num_layers"]) == (cell, zoneout, tied, L)
    assert (card["embedding_size"], card["hidden_size"], card["vocab_size"]) == (E, H, V)
    assert card["state_names"] == (["h"] if cell in ("rnn", "gru") else ["h", "c"])
    assert card["graphs"] == {"predict": A.PREDICT_GRAPH, "score": A.SCORE_GRAPH}
    assert card["data_files"] == [A.WEIGHTS_FILE]
    assert card["weights_dtype"] == "float32"
    parity = card["export"]["parity_max_abs"]
    assert set(parity) == {"onnxruntime_vs_torch", "stepwise_vs_full", "padding"}
    assert all(0.0 <= v <= TOL for v in parity.values()), parity
    A.verify_files(ex.path, A.read_card(ex.path))
    assert Vocab.load(ex.path / A.VOCAB_FILE).itos == tiny_vocab().itos


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_predict_ragged_batch_matches_torch(exported, cfg) -> None:
    ex = exported(*cfg)
    rng = np.random.default_rng(7)
    lengths = [6, 1, 3, 9, 2]
    tokens = ragged(rng, lengths)
    state = ex.random_state(rng, len(lengths))
    lp, new = ex.run_predict(tokens, lengths, state)
    assert lp.shape == (len(lengths), V)
    for row, n in enumerate(lengths):
        t_lp, t_state = ex.torch_row(tokens[row, :n], state, row)
        assert np.abs(lp[row] - t_lp[-1]).max() <= TOL
        for k, s in enumerate(t_state):
            assert np.abs(new[k][:, row] - s).max() <= TOL


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_stepwise_equals_all_at_once(exported, cfg) -> None:
    ex = exported(*cfg)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, V, size=(2, 7))
    state = ex.random_state(rng, 2)
    full_lp, full_state = ex.run_predict(tokens, [7, 7], state)
    st = state
    for t in range(7):
        lp, new = ex.run_predict(tokens[:, t : t + 1], [1, 1], st)
        st = dict(zip(ex.names, new, strict=True))
    assert np.abs(lp - full_lp).max() <= TOL
    for k, s in enumerate(ex.names):
        assert np.abs(st[s] - full_state[k]).max() <= TOL


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_padding_never_matters(exported, cfg) -> None:
    ex = exported(*cfg)
    rng = np.random.default_rng(5)
    lengths = [4, 2, 5]
    tokens = ragged(rng, lengths, extra=3)
    state = ex.random_state(rng, 3)
    lp, new = ex.run_predict(tokens, lengths, state)
    other = tokens.copy()
    for row, n in enumerate(lengths):
        other[row, n:] = rng.integers(0, V, size=other.shape[1] - n)
    lp2, new2 = ex.run_predict(other, lengths, state)
    np.testing.assert_allclose(lp2, lp, atol=1e-6)
    for a, b in zip(new, new2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for row, n in enumerate(lengths):  # each row alone, unpadded
        row_state = {s: v[:, row : row + 1] for s, v in state.items()}
        alone, alone_state = ex.run_predict(tokens[row : row + 1, :n], [n], row_state)
        assert np.abs(alone[0] - lp[row]).max() <= TOL
        for k in range(len(new)):
            assert np.abs(alone_state[k][:, 0] - new[k][:, row]).max() <= TOL


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[2]], ids=_id)
def test_dynamic_batch_and_time(exported, cfg) -> None:
    ex = exported(*cfg)
    rng = np.random.default_rng(11)
    for B, T in [(1, 1), (3, 4), (6, 9), (2, 16)]:
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0] = T
        tokens = rng.integers(0, V, size=(B, T))
        state = ex.random_state(rng, B)
        lp, new = ex.run_predict(tokens, lengths, state)
        assert lp.shape == (B, V) and all(s.shape == (L, B, H) for s in new)
        row = B - 1
        t_lp, _ = ex.torch_row(tokens[row, : lengths[row]], state, row)
        assert np.abs(lp[row] - t_lp[-1]).max() <= TOL
        tlp, ranks, *_ = ex.score.run(None, {**ex.feeds(tokens, lengths, state), A.TARGETS: tokens})
        assert tlp.shape == ranks.shape == (B, T)


def _rank_bounds(log_probs: np.ndarray, target: int) -> tuple[int, int]:
    """Allowed rank range, tolerating words within TOL of the target (near-ties)."""
    t = log_probs[target]
    return int((log_probs > t + TOL).sum()), int((log_probs > t - TOL).sum()) - 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_score_graph_matches_torch(exported, cfg) -> None:
    ex = exported(*cfg)
    rng = np.random.default_rng(13)
    lengths = [5, 1, 8, 3]
    tokens = ragged(rng, lengths)
    targets = rng.integers(0, V, size=tokens.shape)  # garbage targets on padding too
    state = ex.random_state(rng, len(lengths))
    tlp, ranks, *new = ex.score.run(None, {**ex.feeds(tokens, lengths, state), A.TARGETS: targets})
    assert tlp.dtype == np.float32 and ranks.dtype == np.int64
    exact = 0
    for row, n in enumerate(lengths):
        t_lp, t_state = ex.torch_row(tokens[row, :n], state, row)
        expected = t_lp[np.arange(n), targets[row, :n]]
        assert np.abs(tlp[row, :n] - expected).max() <= TOL
        for t in range(n):
            lo, hi = _rank_bounds(t_lp[t], targets[row, t])
            assert lo <= ranks[row, t] <= hi
            exact += int(ranks[row, t] == int((t_lp[t] > t_lp[t, targets[row, t]]).sum()))
        assert np.all(tlp[row, n:] == 0.0) and np.all(ranks[row, n:] == 0)
        for k, s in enumerate(t_state):
            assert np.abs(new[k][:, row] - s).max() <= TOL
    assert exact >= sum(lengths) - 1
    # the same states as the predict graph
    _, p_new = ex.run_predict(tokens, lengths, state)
    for a, b in zip(new, p_new, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _nodes(path: Path) -> list:
    return list(onnx.load(str(path)).graph.node)


def _attr(node, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_graphs_use_native_operators(exported, cfg) -> None:
    ex = exported(*cfg)
    cell, zoneout, _ = cfg
    for graph in (A.PREDICT_GRAPH, A.SCORE_GRAPH):
        nodes = _nodes(ex.path / graph)
        ops = [n.op_type for n in nodes]
        recurrent = [n for n in nodes if n.op_type in ("LSTM", "GRU", "RNN", "Scan")]
        assert len(recurrent) == L, ops
        if zoneout:
            assert all(n.op_type == "Scan" for n in recurrent)
            continue
        expected = {"rnn": "RNN", "gru": "GRU"}.get(cell, "LSTM")
        assert all(n.op_type == expected for n in recurrent)
        for n in recurrent:
            assert _attr(n, "hidden_size") == H
            if cell == "gru":
                assert _attr(n, "linear_before_reset") == 1
            if cell == "rnn":
                assert [a.decode() if isinstance(a, bytes) else a for a in _attr(n, "activations")] == ["Tanh"]
            if cell == "cifg":
                assert _attr(n, "input_forget") == 1
            elif cell in ("lstm", "peephole", "highway"):
                assert not _attr(n, "input_forget")
            has_p = len(n.input) > 7 and n.input[7] != ""
            assert has_p == (cell == "peephole")
        if cell == "highway":
            assert "Sigmoid" in ops  # the highway gates


def test_peephole_weights_are_in_the_graph(exported) -> None:
    ex = exported("peephole")
    proto = onnx.load(str(ex.path / A.PREDICT_GRAPH))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    lstm = [n for n in proto.graph.node if n.op_type == "LSTM"]
    for layer, node in enumerate(lstm):
        p = inits[node.input[7]]
        assert p.shape == (1, 3 * H)
        p_i, p_f, p_o = getattr(ex.model.recurrent, f"peephole_l{layer}").detach().numpy()
        np.testing.assert_array_equal(p[0], np.concatenate([p_i, p_o, p_f]))  # ONNX order i, o, f
        assert np.abs(p).max() > 0


def _float_initializer_bytes(path: Path) -> int:
    proto = onnx.load(str(path))  # external data resolved
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer
               if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


def _stored_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".onnx", ".bin"))


def test_float16_weights(exported, tmp_path: Path) -> None:
    model = exported("lstm").model
    path = export_model(model, tiny_vocab(), tmp_path, "half", 1, weights_dtype="float16")
    full = exported("lstm").path
    assert _float_initializer_bytes(path / A.PREDICT_GRAPH) < 0.6 * _float_initializer_bytes(full / A.PREDICT_GRAPH)
    assert (path / A.WEIGHTS_FILE).stat().st_size < 0.6 * (full / A.WEIGHTS_FILE).stat().st_size
    assert _stored_bytes(path) < _stored_bytes(full)
    card = A.read_card(path)
    assert card.weights_dtype == "float16"
    assert max(card.export["parity_max_abs"].values()) <= TOL
    proto = onnx.load(str(path / A.PREDICT_GRAPH))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    # independently: the graph equals torch with its weights rounded to half precision
    rounded = tiny_model("lstm", seed=0)
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    ex = Exported(rounded, path)
    rng = np.random.default_rng(0)
    lengths = [4, 7]
    tokens = ragged(rng, lengths)
    state = ex.random_state(rng, 2)
    lp, _ = ex.run_predict(tokens, lengths, state)
    for row, n in enumerate(lengths):
        assert np.abs(lp[row] - ex.torch_row(tokens[row, :n], state, row)[0][-1]).max() <= TOL
    # the original model was not modified by the export
    for a, b in zip(model.parameters(), tiny_model("lstm", seed=0).parameters(), strict=True):
        assert a.shape == b.shape


def test_int8_quantized_graph(exported, tmp_path: Path) -> None:
    model = exported("lstm", tied=False).model
    path = export_model(model, tiny_vocab(), tmp_path, "q", 1, quantize="int8")
    card = A.read_card(path)
    assert card.graphs["predict_int8"] == A.PREDICT_INT8_GRAPH
    assert (path / A.PREDICT_INT8_GRAPH).is_file()
    assert A.PREDICT_INT8_GRAPH in card.files
    delta = card.export["int8_vs_fp32_max_abs"]
    assert isinstance(delta, float) and 0.0 <= delta < 1.0
    A.verify_files(path, card)
    sess = session(path / A.PREDICT_INT8_GRAPH)
    feeds = {A.TOKENS: np.array([[1, 5, 7]], np.int64), A.LENGTHS: np.array([3], np.int64)}
    feeds.update({A.state_input(s): np.zeros((L, 1, H), np.float32) for s in card.state_names})
    lp = sess.run([A.LOG_PROBS], feeds)[0]
    assert lp.shape == (1, V) and np.isfinite(lp).all()
    assert abs(np.exp(lp).sum() - 1.0) < 1e-3


def test_checksums_and_tampering(exported, tmp_path: Path) -> None:
    src = exported("gru").path
    target = tmp_path / "gru" / "1"
    shutil.copytree(src, target)
    card = A.read_card(target)
    assert set(card.files) == {A.PREDICT_GRAPH, A.SCORE_GRAPH, A.WEIGHTS_FILE, A.VOCAB_FILE}
    assert all(len(h) == 64 for h in card.files.values())
    A.verify_files(target, card)
    for name in card.files:
        copy = tmp_path / f"tamper-{name}"
        shutil.copytree(target, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(A.ArtifactError, match="checksum mismatch"):
            A.verify_files(copy, card)
    (target / A.WEIGHTS_FILE).unlink()
    with pytest.raises(A.ArtifactError, match="missing"):
        A.verify_files(target, card)


def test_refuses_existing_version_unless_overwrite(tmp_path: Path) -> None:
    model = tiny_model("rnn", tied=False)
    vocab = tiny_vocab()
    first = export_model(model, vocab, tmp_path, "m")
    assert first == tmp_path / "m" / "1"
    assert export_model(model, vocab, tmp_path, "m") == tmp_path / "m" / "2"  # next free version
    (first / "marker").write_text("old")
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, vocab, tmp_path, "m", 1)
    assert (first / "marker").exists()
    assert export_model(model, vocab, tmp_path, "m", 1, overwrite=True) == first
    assert not (first / "marker").exists()
    A.verify_files(first, A.read_card(first))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left behind
    with pytest.raises(ExportError, match="model name"):
        export_model(model, vocab, tmp_path, "Bad Name")
    with pytest.raises(ExportError, match="vocabulary"):
        export_model(model, Vocab([*SPECIAL_TOKENS, "a"]), tmp_path, "m")
