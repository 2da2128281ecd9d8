"""The study's three modalities, as fixed-size token features for each modality's private encoder.

* **digits** (real): scikit-learn's bundled handwritten digits (1,797 8x8 scans from UCI), each image cut into
  its four 4x4 quadrants -> 4 tokens of 16 pixels.
* **speech** (real synthesiser, not recorded speech): ten Speech-Commands words spoken by Debian's espeak-ng
  across 8 English accents x many voice variants, speeds and pitches, with white noise mixed in at a random SNR.
  Log-mel spectrogram (32 bins), silence trimmed, stretched to 24 frames -> 6 tokens of 4 frames x 32 bins.
  The test set uses voice variants never heard in training.
* **points** (synthetic geometry): 128 points sampled from the surfaces of 8 parametric 3-D shapes under random
  rotation, anisotropic scaling (0.7-1.3 per axis) and jitter; put in their principal-axes frame and described
  octant by octant -> 8 tokens of 14 numbers (share of points, mean, covariance, radii, eigenvalue ratios).

Every split is fixed by seeds; ``load_all`` caches the arrays under the work directory.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEECH_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SHAPE_WORDS = ("sphere", "cube", "cylinder", "cone", "pyramid", "ring", "disk", "helix")
PARITY_WORDS = ("yes", "no")  # "is it even": yes / no (reuses two of the speech task's answer words)
MODALITIES = ("digits", "speech", "points")
# Two more tasks, carved from the same sources, for the growth study (Fig. 5) and the new task of Table 3:
# ``numbers`` = digit words spoken by espeak-ng (a second audio task), ``parity`` = "is the digit even?" on the
# digit images (a second image task). Their answers are words the answer layer already has, so the base is the same.
EXTRA_TASKS = ("numbers", "parity")
TASKS = MODALITIES + EXTRA_TASKS
LABELS = {
    "digits": DIGIT_WORDS,
    "speech": SPEECH_WORDS,
    "points": SHAPE_WORDS,
    "numbers": DIGIT_WORDS,
    "parity": PARITY_WORDS,
}

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "croak", "Andy", "Annie", "david", "linda")
TEST_VARIANTS = ("m7", "f4", "klatt3", "max")  # speakers never heard in training

SAMPLE_RATE = 22050
N_MELS = 32
SPEECH_FRAMES = 24
SPEECH_TOKENS = 6


@dataclass
class Split:
    """Token features ``x`` [N, tokens, dim] and integer labels ``y`` [N] of one modality's train or test set."""

    x: np.ndarray
    y: np.ndarray


# ------------------------------------------------------------------------------------------------------ digits
def digits(test_fraction: float = 0.4, seed: int = 0) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    img = d.images.astype(np.float32) / 16.0  # [N, 8, 8]
    tokens = np.stack(
        [img[:, r : r + 4, c : c + 4].reshape(len(img), 16) for r in (0, 4) for c in (0, 4)], axis=1
    )  # [N, 4, 16]
    xtr, xte, ytr, yte = train_test_split(
        tokens, d.target, test_size=test_fraction, random_state=seed, stratify=d.target
    )
    return Split(xtr, ytr.astype(np.int64)), Split(xte, yte.astype(np.int64))


# ------------------------------------------------------------------------------------------------------ speech
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _synthesise(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    out = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True,
        capture_output=True,
    ).stdout
    with wave.open(io.BytesIO(out)) as w:
        assert w.getframerate() == SAMPLE_RATE and w.getsampwidth() == 2, (w.getframerate(), w.getsampwidth())
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    return pcm


def _mel_filters(n_fft: int = 512, n_mels: int = N_MELS, fmin: float = 60.0, fmax: float = 8000.0) -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, len(freqs)), dtype=np.float32)
    for i in range(n_mels):
        lo, mid, hi = edges[i : i + 3]
        fb[i] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return fb


_FB = _mel_filters()


def log_mel_tokens(pcm: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram, silence trimmed, stretched to SPEECH_FRAMES frames -> [SPEECH_TOKENS, 4 * N_MELS]."""
    n_fft, hop = 512, 220
    pcm = np.pad(pcm, (n_fft // 2, n_fft // 2))
    n = 1 + (len(pcm) - n_fft) // hop
    frames = np.stack([pcm[i * hop : i * hop + n_fft] for i in range(n)]) * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = np.log(power @ _FB.T + 1e-6)  # [frames, N_MELS]
    energy = mel.mean(axis=1)
    voiced = np.nonzero(energy > energy.max() - 6.0)[0]  # within ~26 dB of the loudest frame
    mel = mel[voiced[0] : voiced[-1] + 1] if len(voiced) else mel
    src = np.linspace(0, len(mel) - 1, SPEECH_FRAMES)
    stretched = np.stack([np.interp(src, np.arange(len(mel)), mel[:, b]) for b in range(N_MELS)], axis=1)
    stretched = (stretched - stretched.mean()) / (stretched.std() + 1e-6)
    return stretched.reshape(SPEECH_TOKENS, -1).astype(np.float32)


def speech(
    n_train_variants: int | None = None,
    n_test_variants: int | None = None,
    seed: int = 0,
    accents: tuple[str, ...] = ACCENTS,
    words: tuple[str, ...] = SPEECH_WORDS,
) -> tuple[Split, Split]:
    """Every word x accent x variant once, each at a random speed, pitch and noise level (seeded)."""
    rng = np.random.default_rng(seed)
    jobs = []
    for split, variants in (("train", TRAIN_VARIANTS[:n_train_variants]), ("test", TEST_VARIANTS[:n_test_variants])):
        for label, word in enumerate(words):
            for accent in accents:
                for variant in variants:
                    speed = int(rng.integers(110, 230))
                    pitch = int(rng.integers(20, 80))
                    snr_db = float(rng.uniform(5.0, 25.0))
                    jobs.append(
                        (split, label, word, f"{accent}+{variant}", speed, pitch, snr_db, int(rng.integers(2**31)))
                    )

    def make(job):
        split, label, word, voice, speed, pitch, snr_db, noise_seed = job
        pcm = _synthesise(word, voice, speed, pitch)
        power = float(np.mean(pcm**2)) + 1e-12
        noise = np.random.default_rng(noise_seed).standard_normal(len(pcm)).astype(np.float32)
        pcm = pcm + noise * np.sqrt(power / 10 ** (snr_db / 10))
        return split, label, log_mel_tokens(pcm)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(make, jobs))
    out = {}
    for split in ("train", "test"):
        xs = [r[2] for r in results if r[0] == split]
        ys = [r[1] for r in results if r[0] == split]
        out[split] = Split(np.stack(xs), np.array(ys, dtype=np.int64))
    return out["train"], out["test"]


# ------------------------------------------------------------------------------------------------------ points
def _surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    u, v = rng.random(n), rng.random(n)
    if shape == "sphere":
        p = rng.standard_normal((n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if shape == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(0, 3, n)
        p[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)
        return p
    if shape == "cylinder":
        t = 2 * np.pi * u
        return np.stack([np.cos(t), np.sin(t), 2 * v - 1], axis=1)
    if shape == "cone":
        t, h = 2 * np.pi * u, np.sqrt(v)  # uniform over the lateral surface
        return np.stack([h * np.cos(t), h * np.sin(t), 1 - 2 * h], axis=1)
    if shape == "pyramid":  # square base at z = -1, apex at z = 1; points on the four sides
        side = rng.integers(0, 4, n)
        h = 1 - np.sqrt(v)  # 0 at the base, 1 at the apex
        s = (2 * u - 1) * (1 - h)
        edge = 1 - h
        pts = np.zeros((n, 3))
        pts[:, 2] = 2 * h - 1
        for k, (a, b) in enumerate(((0, 1), (0, -1), (1, 1), (1, -1))):
            sel = side == k
            pts[sel, a] = b * edge[sel]
            pts[sel, 1 - a] = s[sel]
        return pts
    if shape == "ring":  # torus, R = 1, r = 0.3
        t, w = 2 * np.pi * u, 2 * np.pi * v
        return np.stack([(1 + 0.3 * np.cos(w)) * np.cos(t), (1 + 0.3 * np.cos(w)) * np.sin(t), 0.3 * np.sin(w)], 1)
    if shape == "disk":
        r, t = np.sqrt(u), 2 * np.pi * v
        return np.stack([r * np.cos(t), r * np.sin(t), 0.03 * rng.standard_normal(n)], axis=1)
    if shape == "helix":
        t = 4 * np.pi * u
        return np.stack([np.cos(t), np.sin(t), t / (2 * np.pi) - 1], axis=1) + 0.08 * rng.standard_normal((n, 3))
    raise ValueError(shape)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def canonical_frame(p: np.ndarray) -> np.ndarray:
    """Centre and rotate into the principal axes (largest variance first), signs fixed by the third moment."""
    p = p - p.mean(axis=0)
    _, vectors = np.linalg.eigh(np.cov(p.T))
    q = p @ vectors[:, ::-1]
    sign = np.sign((q**3).mean(axis=0))
    sign[sign == 0] = 1
    q = q * sign
    return q / np.linalg.norm(q, axis=1).max()


def point_tokens(p: np.ndarray) -> np.ndarray:
    """One token per octant of the canonical frame: share of points, mean, covariance (6), radius mean and std,
    and the two smaller-to-largest eigenvalue ratios of the octant's points (line, sheet or blob) -> [8, 14]."""
    radius = np.linalg.norm(p, axis=1)
    tokens = []
    for octant in range(8):
        side = np.array([(octant >> i) & 1 for i in range(3)], dtype=bool)
        sel = np.all((p >= 0) == side, axis=1)
        q = p[sel]
        if len(q) < 2:
            tokens.append(np.zeros(14))
            continue
        cov = np.cov(q.T)
        ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
        r = radius[sel]
        tokens.append(
            np.concatenate(
                [[len(q) / len(p)], q.mean(0), cov[np.triu_indices(3)], [r.mean(), r.std()], ev[1:] / (ev[0] + 1e-9)]
            )
        )
    return np.stack(tokens).astype(np.float32)


def points(n_train_per_shape: int = 60, n_test_per_shape: int = 40, n_points: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for per_shape in (n_train_per_shape, n_test_per_shape):
        xs, ys = [], []
        for label, shape in enumerate(SHAPE_WORDS):
            for _ in range(per_shape):
                p = _surface(shape, n_points, rng)
                p = p * rng.uniform(0.7, 1.3, 3)  # anisotropic scale before rotating
                p = p @ _random_rotation(rng).T + 0.03 * rng.standard_normal(p.shape)
                xs.append(point_tokens(canonical_frame(p)))
                ys.append(label)
        perm = rng.permutation(len(xs))
        out.append(Split(np.stack(xs)[perm], np.array(ys, dtype=np.int64)[perm]))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------------- all
def parity(tr: Split, te: Split) -> tuple[Split, Split]:
    """The digit images with the question "is it even?" (label 0 = yes, 1 = no): a second task on the same images."""
    return Split(tr.x, tr.y % 2), Split(te.x, te.y % 2)


def carve_validation(train: Split, fraction: float = 0.15, seed: int = 0) -> tuple[Split, Split]:
    """Split a training set into (train, validation): per class, a seeded ``fraction`` of its examples (at least
    one) goes to validation. The seed is fixed, not the study's seed, so every seed selects on the same examples."""
    rng = np.random.default_rng(10_000 + seed)
    val = []
    for label in np.unique(train.y):
        idx = np.flatnonzero(train.y == label)
        val.append(rng.permutation(idx)[: max(1, round(fraction * len(idx)))])
    is_val = np.zeros(len(train.y), dtype=bool)
    is_val[np.concatenate(val)] = True
    return Split(train.x[~is_val], train.y[~is_val]), Split(train.x[is_val], train.y[is_val])


def load_all(cache: Path, tiny: bool, tasks: tuple[str, ...] = MODALITIES) -> dict[str, tuple[Split, Split]]:
    """Every task's (train, test), built once and cached as ``cache/<task>.npz``."""
    cache.mkdir(parents=True, exist_ok=True)
    makers = {
        "digits": digits,
        "speech": (lambda: speech(n_train_variants=2, n_test_variants=1, accents=ACCENTS[:2])) if tiny else speech,
        "points": (lambda: points(n_train_per_shape=4, n_test_per_shape=3)) if tiny else points,
        "numbers": lambda: speech(
            n_train_variants=2 if tiny else 8,
            n_test_variants=1 if tiny else 4,
            seed=1,
            accents=ACCENTS[:2] if tiny else ACCENTS[:4],
            words=DIGIT_WORDS,
        ),
        "parity": lambda: parity(*digits()),
    }
    data = {}
    for m in tasks:
        file = cache / f"{m}.npz"
        if file.is_file():
            z = np.load(file)
            data[m] = (Split(z["xtr"], z["ytr"]), Split(z["xte"], z["yte"]))
            continue
        tr, te = makers[m]()
        if tiny and m in ("digits", "parity"):
            tr, te = Split(tr.x[:40], tr.y[:40]), Split(te.x[:20], te.y[:20])
        np.savez_compressed(file, xtr=tr.x, ytr=tr.y, xte=te.x, yte=te.y)
        data[m] = (tr, te)
    return data
