"""Training-Free Bayesianization of a LoRA adapter.

For every LoRA module y = base(x) + s * B A x, with B (out x r) and A (r x in)::

    B = U diag(d) V^T            (thin SVD, float32)
    B' = U diag(d)               (out x r, fixed)
    A' = V^T A                   (r x in, posterior mean)      => B'A' = BA exactly
    q(A'_ij) = N(A'_ij, (sigma / d_i)^2)                       (one sigma for the whole model)

so the weight noise s * B' E is isotropic N(0, sigma^2) noise on the column space of B.

At prediction time each of the R rows of a batch carries its own sample of A'; rows that share a
sample (the B prompts of one Monte Carlo sample) share one slice of the noise (N x r x in, not
R x r x in). The shrink x -> A'_row x is one ``bmm`` per module, the expand by B' is shared. No
copy of any weight matrix is made per sample.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

_SAMPLE_BITS = 20  # sample index n < 2**20 in the derived per-sample seed
_PACKED_SEEDS = 2**43  # seeds below this are packed with n into 63 bits; larger ones are hashed
_DRAW_KEYS = itertools.count()  # NoiseDraw.key: unique for the life of the process


def svd_reparam(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A', B', d) with B' = U diag(d), A' = V^T A, in float32.  A: (r, in), B: (out, r)."""
    U, d, Vh = torch.linalg.svd(B.detach().float(), full_matrices=False)  # (out, r), (r,), (r, r)
    return Vh @ A.detach().float(), U * d, d  # (r, in), (out, r), (r,)


#: seeds are in [0, SEED_LIMIT): what torch.Generator.manual_seed takes (a uint64)
SEED_LIMIT = 2**64


def sample_seed(seed: int, n: int) -> int:
    """The generator seed (a uint64) of Monte Carlo sample ``n`` of ``seed``: sample n does not depend on N.

    Seeds below 2**43 are packed with n into [0, 2**63), one-to-one (the streams these seeds have
    always had); a larger seed, up to 2**64 - 1, is mixed whole with n by a 64-bit BLAKE2b hash into
    [2**63, 2**64), so it never meets a packed seed and two seeds share a stream only by a hash
    collision, never by wrapping around.
    """
    if not 0 <= n < 2**_SAMPLE_BITS:
        raise ValueError(f"sample index must be in [0, 2**{_SAMPLE_BITS}), got {n}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if seed < _PACKED_SEEDS:
        return (seed << _SAMPLE_BITS) | n
    digest = hashlib.blake2b(seed.to_bytes(8, "little") + n.to_bytes(4, "little"), digest_size=8,
                             person=b"tfb-sample-seed").digest()
    return int.from_bytes(digest, "little") | 2**63


class NoiseState:
    """One forward's noise for all modules of a posterior: per module (R / group, r, in) standard-normal
    draws (None: the posterior mean), sigma, and the rows that share a sample (``group``)."""

    __slots__ = ("z_rows", "sigma", "group")

    def __init__(self) -> None:
        self.z_rows: list[torch.Tensor] | None = None
        self.sigma = 0.0
        self.group = 1


class TFBLinear(nn.Module):
    """A LoRA linear layer in TFB form: base(x) + s * B' (A'_row x), one A' sample per batch row."""

    def __init__(self, name: str, base: nn.Module, A: torch.Tensor, B: torch.Tensor, d: torch.Tensor,
                 scaling: float, d_floor: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.name = name
        self.base_layer = base
        self.scaling = scaling
        device = A.device
        self.register_buffer("lora_A", A.to(device=device, dtype=dtype), persistent=False)  # (r, in)
        self.register_buffer("lora_B", B.to(device=device, dtype=dtype), persistent=False)  # (out, r)
        self.register_buffer("d", d.to(device), persistent=False)  # (r,) float32
        self.register_buffer("inv_d", 1.0 / d.clamp_min(d_floor).to(device), persistent=False)  # (r,) float32
        # 1 / d as a column in the noise's dtype: the std of row i of A' is sigma * inv_d_col[i]
        self.register_buffer("inv_d_col", self.inv_d.to(dtype)[:, None], persistent=False)  # (r, 1)
        # this forward's noise: module `index` of a state that TFBPosterior.set_noise sets once for
        # all its modules (not 3 nn.Module attributes per module, twice per forward)
        self.noise_state = NoiseState()
        self.index = 0

    @property
    def z(self) -> torch.Tensor | None:
        """This forward's standard-normal draws, (R / group, r, in): sample s serves the ``group``
        rows s*group .. (s+1)*group - 1; None: the posterior mean."""
        z_rows = self.noise_state.z_rows
        return None if z_rows is None else z_rows[self.index]

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, T, in) -> A'_row x (R, T, r), with this forward's sample of A' for each row."""
        state = self.noise_state
        if state.z_rows is None:
            return x @ self.lora_A.T  # (R, T, r)
        z, group = state.z_rows[self.index], state.group
        R, T, _ = x.shape
        S = z.shape[0]
        if S * group != R:
            raise RuntimeError(f"{self.name}: noise for {S * group} rows, batch has {R}")
        # A' + sigma * z / d, made here one module at a time: no scaled copy of the noise is kept, and
        # sigma is a scalar argument (no per-forward tensor op: a kernel launch each on a GPU)
        a_rows = torch.addcmul(self.lora_A, z, self.inv_d_col, value=state.sigma)  # (S, r, in)
        # rows of one sample share one bmm slice: (S, group*T, in) @ (S, in, r)
        return torch.bmm(x.reshape(S, group * T, -1), a_rows.transpose(1, 2)).view(R, T, -1)  # (R, T, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(self.base_layer(x), x)  # (R, T, out)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y + s * B' (A'_row x): this adapter's share of the layer's output, in place where it can."""
        z = self.shrink(x.to(self.lora_A.dtype))  # (R, T, r)
        if z.dtype == y.dtype and y.is_contiguous():  # y += s * z B'^T in one pass over y, no temporaries
            y2 = y.view(-1, y.shape[-1])  # (R*T, out)
            return y2.addmm_(z.reshape(-1, z.shape[-1]), self.lora_B.T, alpha=self.scaling).view(y.shape)
        return y + (self.scaling * (z @ self.lora_B.T)).to(y.dtype)  # (R, T, out)

    def add_delta_rows(self, y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """y (R, C) + the output features ``ids`` of this adapter's s * B' (A'_row x)."""
        z = self.shrink(x.to(self.lora_A.dtype).unsqueeze(1)).squeeze(1)  # (R, r)
        return y + (self.scaling * (z @ self.lora_B[ids].T)).to(y.dtype)  # (R, C)


def base_rows(base: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The output features ``ids`` of a linear layer: x (R, in) -> (R, len(ids))."""
    weight = base.weight[ids]  # (C, in)
    y = x.to(weight.dtype) @ weight.T  # (R, C)
    if getattr(base, "bias", None) is not None:
        y = y + base.bias[ids]
    return y


@dataclass
class NoiseDraw:
    """Fixed standard-normal draws Z, one (N, r, in) tensor per module: common random numbers.

    The deviation of A' for sample n at a given sigma is (sigma / d) * Z[n].
    """

    seed: int
    z: list[torch.Tensor]  # per module: (N, r, in)
    #: identifies this draw's values in caches of results computed with it (never reused, unlike id())
    key: int = field(default_factory=lambda: next(_DRAW_KEYS), compare=False)

    @property
    def n_samples(self) -> int:
        return self.z[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.z)


class TFBPosterior:
    """The Gaussian over A' of every LoRA module of one model, with one sigma."""

    def __init__(self, modules: list[TFBLinear], weights_sha256: str | None = None) -> None:
        if not modules:
            raise ValueError("no LoRA modules to Bayesianize")
        self.modules = modules
        #: the adapter's identity as peft held it (:func:`tfb_core.bayes.lora.lora_sha256`), for caches
        self.weights_sha256 = weights_sha256
        self.noise_state = NoiseState()
        for k, m in enumerate(modules):  # every module reads its draws from the one state
            m.noise_state, m.index = self.noise_state, k

    @property
    def device(self) -> torch.device:
        return self.modules[0].lora_A.device

    @property
    def dtype(self) -> torch.dtype:
        return self.modules[0].lora_A.dtype

    def draw(self, seed: int, n_samples: int) -> NoiseDraw:
        """Standard-normal Z for samples 0..N-1 of ``seed``, on the model's device and in its dtype.

        Sample n is drawn from its own generator (seeded by :func:`sample_seed`), so the first k
        samples of an N-sample draw equal a k-sample draw, and nothing else in a batch matters.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        gen = torch.Generator(device=self.device)
        per_sample: list[list[torch.Tensor]] = []
        for n in range(n_samples):
            gen.manual_seed(sample_seed(seed, n))
            per_sample.append([
                torch.randn(m.lora_A.shape, generator=gen, device=self.device, dtype=self.dtype)
                for m in self.modules
            ])  # per module: (r, in)
        z = [torch.stack([s[k] for s in per_sample]) for k in range(len(self.modules))]  # (N, r, in)
        return NoiseDraw(seed=seed, z=z)

    def set_noise(self, sigma: float, z_rows: list[torch.Tensor] | None, group: int = 1) -> None:
        """Arm every module for one forward: row j uses A' + (sigma / d) * z_rows[k][j // group].

        ``z_rows[k]`` is (R / group, r, in) for module k; ``None`` (or sigma = 0) means the posterior
        mean. ``group`` > 1 lets consecutive rows share a sample (sample-major rows of B prompts:
        group = B) without a copy of the noise per row: the noise costs O(N r in) per module.
        """
        state = self.noise_state
        if z_rows is None or sigma == 0.0:
            state.z_rows, state.sigma, state.group = None, 0.0, 1
            return
        if len(z_rows) != len(self.modules):
            raise ValueError(f"noise for {len(z_rows)} modules, the model has {len(self.modules)}")
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        state.z_rows, state.sigma, state.group = list(z_rows), float(sigma), group

    def clear_noise(self) -> None:
        self.set_noise(0.0, None)
