"""Every recurrent cell against a hand computation of one step, written out from the equations in
``training/model.py``'s docstring (numpy, float64), plus zoneout, tying and config validation."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.model import CELLS, LanguageModel, ModelConfig  # noqa: E402

E, H, V = 3, 2, 5
TOL = 1e-6


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def make_model(cell: str, *, tied: bool = False, zoneout: float = 0.0, e: int = E, h: int = H, layers: int = 1,
               seed: int = 0) -> LanguageModel:
    """A model with dropout off and every parameter set to known random values."""
    cfg = ModelConfig(vocab_size=V, cell=cell, embedding_size=e, hidden_size=h, num_layers=layers,
                      dropout_embedding=0.0, dropout=0.0, dropout_output=0.0, tied=tied, zoneout=zoneout)
    model = LanguageModel(cfg)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one parameter, set once
            p.copy_(torch.from_numpy(rng.uniform(-1.0, 1.0, size=tuple(p.shape)).astype(np.float32)))
    return model.eval()


def params(model: LanguageModel) -> dict[str, np.ndarray]:
    """Every parameter as float64 numpy, keyed by name with the container prefix dropped."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = name.removeprefix("recurrent.net.").removeprefix("recurrent.")
        out[key] = p.detach().numpy().astype(np.float64)
    return out


def hand_step(cell: str, P: dict[str, np.ndarray], x: np.ndarray, h: np.ndarray,
              c: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One step of one layer, from the docstring. Returns (h', c', layer output y)."""
    if cell == "highway":
        W, R = P["layers.0.weight_ih_l0"], P["layers.0.weight_hh_l0"]
        b = P["layers.0.bias_ih_l0"] + P["layers.0.bias_hh_l0"]
    else:
        W, R = P["weight_ih_l0"], P["weight_hh_l0"]
        bW, bR = P["bias_ih_l0"], P["bias_hh_l0"]
        b = bW + bR

    hs = h.shape[0]

    def rows(k: int) -> slice:
        return slice(k * hs, (k + 1) * hs)

    if cell == "rnn":
        h_new = np.tanh(W @ x + bW + R @ h + bR)
        return h_new, None, h_new
    if cell == "gru":  # gate rows r, z, n
        r = sigmoid(W[rows(0)] @ x + bW[rows(0)] + R[rows(0)] @ h + bR[rows(0)])
        z = sigmoid(W[rows(1)] @ x + bW[rows(1)] + R[rows(1)] @ h + bR[rows(1)])
        n = np.tanh(W[rows(2)] @ x + bW[rows(2)] + r * (R[rows(2)] @ h + bR[rows(2)]))
        h_new = (1 - z) * n + z * h
        return h_new, None, h_new

    def pre(k: int) -> np.ndarray:
        return W[rows(k)] @ x + R[rows(k)] @ h + b[rows(k)]

    if cell == "cifg":  # gate rows i, g, o; f = 1 - i
        i = sigmoid(pre(0))
        f = 1 - i
        g = np.tanh(pre(1))
        c_new = f * c + i * g
        o = sigmoid(pre(2))
    elif cell == "peephole":  # gate rows i, f, g, o; peephole rows p_i, p_f, p_o
        p_i, p_f, p_o = P["peephole_l0"]
        i = sigmoid(pre(0) + p_i * c)
        f = sigmoid(pre(1) + p_f * c)
        g = np.tanh(pre(2))
        c_new = f * c + i * g
        o = sigmoid(pre(3) + p_o * c_new)
    else:  # lstm, and the LSTM inside a highway layer
        i, f, g, o = sigmoid(pre(0)), sigmoid(pre(1)), np.tanh(pre(2)), sigmoid(pre(3))
        c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    y = h_new
    if cell == "highway":
        T = P["gates.0.weight"]
        t = sigmoid(T[:, : x.shape[0]] @ x + T[:, x.shape[0] :] @ h_new + P["gates.0.bias"])
        C = P["carry.0.weight"] if "carry.0.weight" in P else np.eye(hs)
        y = t * h_new + (1 - t) * (C @ x)
    return h_new, c_new, y


def hand_output(P: dict[str, np.ndarray], y: np.ndarray, tied: bool) -> np.ndarray:
    if "projection.weight" in P:
        y = P["projection.weight"] @ y
    W = P["embedding.weight"] if tied else P["decoder.weight"]
    return log_softmax(W @ y + P["decoder.bias"])


def run_one(model: LanguageModel, token: int, h0: np.ndarray, c0: np.ndarray | None):
    state = [torch.from_numpy(h0.astype(np.float32))[None, None]]
    if c0 is not None:
        state.append(torch.from_numpy(c0.astype(np.float32))[None, None])
    with torch.no_grad():
        lp, new = model(torch.tensor([[token]]), tuple(state))
    return lp[0, 0].double().numpy(), [s[0, 0].double().numpy() for s in new]


def initial(cell: str, seed: int = 1, h: int = H) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    h0 = rng.uniform(-1, 1, h).astype(np.float32).astype(np.float64)
    c0 = rng.uniform(-1, 1, h).astype(np.float32).astype(np.float64) if cell not in ("rnn", "gru") else None
    return h0, c0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("cell", CELLS)
def test_single_step_matches_hand_computation(cell: str, tied: bool) -> None:
    model = make_model(cell, tied=tied)
    P = params(model)
    token = 3
    h0, c0 = initial(cell)
    h_new, c_new, y = hand_step(cell, P, P["embedding.weight"][token], h0, c0)
    expected_lp = hand_output(P, y, tied)
    lp, state = run_one(model, token, h0, c0)
    assert len(state) == (1 if c0 is None else 2)
    np.testing.assert_allclose(state[0], h_new, atol=TOL, rtol=0)
    if c0 is not None:
        np.testing.assert_allclose(state[1], c_new, atol=TOL, rtol=0)
    np.testing.assert_allclose(lp, expected_lp, atol=TOL, rtol=0)


def test_highway_identity_carry_when_sizes_match() -> None:
    model = make_model("highway", e=H, h=H)
    assert isinstance(model.recurrent.carry[0], torch.nn.Identity)
    P = params(model)
    h0, c0 = initial("highway")
    _, _, y = hand_step("highway", P, P["embedding.weight"][2], h0, c0)
    lp, _ = run_one(model, 2, h0, c0)
    np.testing.assert_allclose(lp, hand_output(P, y, False), atol=TOL, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_multilayer_shapes(cell: str) -> None:
    cfg = ModelConfig(vocab_size=11, cell=cell, embedding_size=4, hidden_size=6, num_layers=3)
    model = LanguageModel(cfg).eval()
    B, T = 2, 5
    state = model.initial_state(B)
    assert len(state) == len(cfg.state_names) == (1 if cell in ("rnn", "gru") else 2)
    assert all(s.shape == (3, B, 6) for s in state)
    with torch.no_grad():
        lp, new = model(torch.randint(0, 11, (B, T)), state)
        feats, _ = model(torch.randint(0, 11, (B, T)), state, features_only=True)
    assert lp.shape == (B, T, 11)
    assert feats.shape == (B, T, 4)  # tied with H != E: projected to the embedding width
    assert torch.allclose(lp.exp().sum(-1), torch.ones(B, T), atol=1e-5)
    assert len(new) == len(state) and all(s.shape == (3, B, 6) for s in new)


@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "gru"])
def test_zoneout_eval_is_expectation(cell: str) -> None:
    p = 0.3
    model = make_model(cell, zoneout=p)
    P = params(model)
    h0, c0 = initial(cell)
    h_new, c_new, _ = hand_step(cell, P, P["embedding.weight"][1], h0, c0)
    h_z = p * h0 + (1 - p) * h_new
    lp, state = run_one(model, 1, h0, c0)
    np.testing.assert_allclose(state[0], h_z, atol=TOL, rtol=0)
    if c0 is not None:
        np.testing.assert_allclose(state[1], p * c0 + (1 - p) * c_new, atol=TOL, rtol=0)
    # the layer output is the zoned-out h
    np.testing.assert_allclose(lp, hand_output(P, h_z, False), atol=TOL, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_train_keeps_old_or_new_per_unit(cell: str) -> None:
    hidden = 32
    model = make_model(cell, zoneout=0.5, h=hidden)
    P = params(model)
    h0, c0 = initial(cell, h=hidden)
    h_new, c_new, _ = hand_step(cell, P, P["embedding.weight"][4], h0, c0)
    model.train()  # all dropouts are 0: only zoneout is random
    torch.manual_seed(0)
    saw_old = saw_new = False
    for _ in range(4):
        _, state = run_one(model, 4, h0, c0)
        pairs = [(state[0], h0, h_new)] + ([(state[1], c0, c_new)] if c0 is not None else [])
        for got, old, new in pairs:
            is_old = np.abs(got - old) <= TOL
            is_new = np.abs(got - new) <= TOL
            assert np.all(is_old | is_new), "every unit is either its old or its new value"
            saw_old |= bool(np.any(is_old & ~is_new))
            saw_new |= bool(np.any(is_new & ~is_old))
    assert saw_old and saw_new


def test_tied_weights_share_storage() -> None:
    model = LanguageModel(ModelConfig(vocab_size=V, embedding_size=4, hidden_size=4, num_layers=1, tied=True))
    assert model.decoder.weight is model.embedding.weight
    assert model.decoder.weight.data_ptr() == model.embedding.weight.data_ptr()
    assert model.projection is None
    with torch.no_grad():
        model.embedding.weight[2, 1] = 123.0
    assert model.decoder.weight[2, 1].item() == 123.0
    names = [n for n, _ in model.named_parameters()]
    assert "decoder.weight" not in names  # counted once
    untied = LanguageModel(ModelConfig(vocab_size=V, embedding_size=4, hidden_size=4, num_layers=1, tied=False))
    assert untied.decoder.weight.data_ptr() != untied.embedding.weight.data_ptr()
    assert untied.num_parameters() == model.num_parameters() + V * 4


def test_projection_only_when_tied_and_sizes_differ() -> None:
    tied = LanguageModel(ModelConfig(vocab_size=V, embedding_size=3, hidden_size=5, num_layers=1, tied=True))
    assert tied.projection is not None and tuple(tied.projection.weight.shape) == (3, 5)
    assert tied.decoder.weight.shape == (V, 3)
    untied = LanguageModel(ModelConfig(vocab_size=V, embedding_size=3, hidden_size=5, num_layers=1, tied=False))
    assert untied.projection is None and untied.decoder.weight.shape == (V, 5)
    # the projection is on the path: zeroing it leaves only the decoder bias
    with torch.no_grad():
        tied.projection.weight.zero_()
        tied.decoder.bias.copy_(torch.arange(V, dtype=torch.float32))
        lp, _ = tied.eval()(torch.tensor([[1, 2]]), tied.initial_state(1))
    expected = torch.log_softmax(torch.arange(V, dtype=torch.float32), -1)
    assert torch.allclose(lp[0], expected.expand(2, V), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cell": "transformer"}, "unknown cell"),
        ({"cell": "rnn", "zoneout": 0.1}, "zoneout"),
        ({"cell": "highway", "zoneout": 0.1}, "zoneout"),
        ({"cell": "lstm", "zoneout": 1.0}, "zoneout"),
        ({"cell": "gru", "zoneout": -0.1}, "zoneout"),
        ({"cell": "lstm", "num_layers": 0}, "num_layers"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=V, **kwargs)


@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "gru"])
def test_zoneout_allowed_cells(cell: str) -> None:
    assert ModelConfig(vocab_size=V, cell=cell, zoneout=0.2).zoneout == 0.2
