#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""moba-ref end to end: NumPy reads what it writes, run reproduces generate bit for bit, the gradient
files are the backward of a NumPy MoBA written from SPEC, check catches a perturbation, stats and
plot show what selected.npy holds, every bad input exits 2 with one message leaving no output behind,
failed writes are reported, and an interrupted run removes its temporary folder. Random tests print
their seed (seed=N); MOBA_TEST_SEED=N replays it."""
import json
import math
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import xml.etree.ElementTree as ET

import numpy as np

TOOL = sys.argv.pop(1)
GEN_OPTIONS = {"seqlens": "70,0,45", "q-heads": "4", "kv-heads": "2", "head-dim": "16", "block-size": "16",
               "top-k": "3"}


def gen(**changes):
    """The generate command line, with some options changed (top_k="0" sets --top-k 0)."""
    options = dict(GEN_OPTIONS, **{k.replace("_", "-"): v for k, v in changes.items()})
    return ["generate", *(x for k, v in options.items() for x in (f"--{k}", v))]


GEN = gen()


def tool(*args, **kwargs):
    return subprocess.run([TOOL, *args], capture_output=True, text=True, **kwargs)


def file_size_limit(limit, ignore_sigxfsz):
    """A preexec_fn: files the child writes past `limit` bytes fail as on a full disk (root included)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def save_raw(path, header, data):
    """A .npy file with a hand-written version 1.0 header dictionary."""
    pathlib.Path(path).write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data)


def fresh_seed():
    """A new seed for each random test, or MOBA_TEST_SEED's to replay a failure (printed as seed=N)."""
    replay = os.environ.get("MOBA_TEST_SEED")
    return int(replay) if replay else int.from_bytes(os.urandom(4), "little")


def as_f64(a):
    """A moba-ref array as float64 (bf16 travels as <u2 bit patterns)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def numpy_moba(q, k, v, dout, cu_q, cu_k, sel, block, scale):
    """Attention over the blocks of `sel` (held fixed) and its backward, written from SPEC in float64
    independently of the library: out, dq, dk, dv."""
    out, dq, dk, dv = (np.zeros_like(x) for x in (q, q, k, v))
    group = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        a, n, ka, m = cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b]
        if n == 0:
            continue
        pos = m - n + np.arange(n)
        for h in range(q.shape[1]):
            qs, ks, vs, do = q[a:a + n, h], k[ka:ka + m, h // group], v[ka:ka + m, h // group], dout[a:a + n, h]
            chosen = np.zeros((n, (m + block - 1) // block + 1), bool)
            rows = sel[a:a + n, h]
            for w in range(rows.shape[1]):
                chosen[np.arange(n)[rows[:, w] >= 0], rows[rows[:, w] >= 0, w]] = True
            t = np.arange(m)
            mask = chosen[:, t // block] & (t[None, :] <= pos[:, None])
            s = np.where(mask, scale * qs @ ks.T, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            o = p @ vs
            ds = p * (do @ vs.T - (do * o).sum(1, keepdims=True))
            out[a:a + n, h] = o
            dq[a:a + n, h] = scale * ds @ ks
            dk[ka:ka + m, h // group] += scale * ds.T @ qs
            dv[ka:ka + m, h // group] += p.T @ do
    return out, dq, dk, dv


def positions(cu_q, cu_k):
    """Each query token's absolute position (bottom-right aligned) and its sequence's key offset."""
    pos, start = [], []
    for b in range(len(cu_q) - 1):
        n, m = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        pos += list(m - n + np.arange(n))
        start += [cu_k[b]] * n
    return np.array(pos, dtype=np.int64), np.array(start, dtype=np.int64)


def svg_map(path):
    """What an SVG written by plot shows: {(first token, end token, block): share} from the cells'
    geometry and opacity, the red trace as (token, block) points, and every text."""
    root = ET.parse(path).getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    plot = root.find("s:rect[@id='plot']", ns)
    px, py, pw, ph = (float(plot.get(a)) for a in ["x", "y", "width", "height"])
    blocks, tokens = int(plot.get("data-blocks")), int(plot.get("data-tokens"))
    cw = pw / blocks
    token = lambda y: round((float(y) - py) / ph * tokens)
    cells = {}
    for r in root.iterfind("s:rect[@class='cell']", ns):
        x, y, w, h = (float(r.get(a)) for a in ["x", "y", "width", "height"])
        self_block = (x - px) / cw
        assert abs(self_block - round(self_block)) < 1e-3 and abs(w - cw) < 1e-3, (x, w)
        cells[(token(y), token(y + h), round(self_block))] = float(r.get("fill-opacity"))
    trace = []
    for line in root.iterfind("s:polyline[@class='current']", ns):
        for point in line.get("points").split():
            x, y = point.split(",")
            trace.append((token(y), (float(x) - px) / cw - 0.5))
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    return cells, trace, texts, plot


def expected_map(sel, cu_q, max_rows, head=None):
    """The cells plot should draw, computed from selected.npy: rows of ceil(tokens / max_rows) tokens
    that never straddle two sequences, each block's share of the row's (token, head) pairs."""
    tokens = sel.shape[0]
    size = max(1, -(-tokens // max_rows))
    heads = [head] if head is not None else range(sel.shape[1])
    cells = {}
    for b in range(len(cu_q) - 1):
        for t0 in range(cu_q[b], cu_q[b + 1], size):
            t1 = min(t0 + size, cu_q[b + 1])
            chosen = sel[t0:t1, heads].reshape(-1)
            for j in np.unique(chosen[chosen >= 0]):
                cells[(t0, t1, int(j))] = np.count_nonzero(chosen == j) / ((t1 - t0) * len(heads))
    return cells


def parse_stats(text):
    """The numbers stats prints."""
    number = lambda pattern: [int(x) for x in re.search(pattern, text).groups()]
    table = {int(m[0]): [int(m[1]), int(m[2]), int(m[3])]
             for m in re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+$", text, re.M)}
    out = {"blocks": number(r"attended blocks: (\d+) of (\d+)"), "table": table}
    if "causal pairs" in text:
        out["pairs"] = number(r"attended key pairs: (\d+) of (\d+) causal pairs")
    if "rows with a choice" in text:
        out["ties"] = number(r"near-ties: (\d+) of (\d+) rows with a choice")
    return out


def numpy_stats(sel, cu_q, cu_k, block):
    """stats' numbers, from SPEC: block load, attended blocks and key pairs."""
    pos, _ = positions(cu_q, cu_k)
    cur = pos // block
    n_blocks = int(max(cur.max(initial=0) + 1, max(-(-(cu_k[b + 1] - cu_k[b]) // block) for b in range(len(cu_k) - 1))))
    table = {j: [0, 0, 0] for j in range(n_blocks)}
    valid = sel >= 0
    for j in range(n_blocks):
        table[j][0] = int(np.count_nonzero((sel == j) & (cur[:, None, None] == j)))
        table[j][1] = int(np.count_nonzero((sel == j) & (cur[:, None, None] != j)))
        table[j][2] = int(np.count_nonzero(cur > j) * sel.shape[1])
    count = valid.sum(2)
    pairs = int(np.sum((pos - cur * block + 1)[:, None] + (count - 1) * block))
    return {"blocks": [int(valid.sum()), int(np.sum(cur + 1) * sel.shape[1])], "table": table,
            "pairs": [pairs, int(np.sum(pos + 1) * sel.shape[1])]}


def numpy_near_ties(q, k, cu_q, cu_k, block, top_k, eps):
    """Rows (token, head) with more than K-1 history blocks whose (K-1)-th and K-th best history
    scores q . mean(block) are within 4 (D + 2) eps of the larger |q_e kbar_e| sum: (ties, rows)."""
    pos, _ = positions(cu_q, cu_k)
    group, d = q.shape[1] // k.shape[1], q.shape[2]
    ties = rows = 0
    for b in range(len(cu_q) - 1):
        ks = k[cu_k[b]:cu_k[b + 1]]
        kbar = np.stack([ks[j:j + block].mean(0) for j in range(0, len(ks), block)]) if len(ks) else None
        for t in range(cu_q[b], cu_q[b + 1]):
            c = pos[t] // block
            if top_k < 2 or c <= top_k - 1:
                continue
            for h in range(q.shape[1]):
                prod = q[t, h] * kbar[:c, h // group]
                score, mag = prod.sum(1), np.abs(prod).sum(1)
                order = sorted(range(c), key=lambda j: (-score[j], j))
                a, z = order[top_k - 2], order[top_k - 1]
                rows += 1
                ties += abs(score[a] - score[z]) <= 4 * (d + 2) * eps * max(mag[a], mag[z])
    return ties, rows


# Long enough (seconds) to be interrupted while it computes, and light on memory.
SLOW = gen(seqlens=",".join(["1000"] * 20), q_heads="2", kv_heads="1")


class MobaRef(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def generate(self, name, *extra):
        r = tool(*GEN, *extra, "--seed", str(np.random.randint(1 << 30)), "--out", self.path(name))
        self.assertEqual(r.returncode, 0, r.stderr)
        return self.path(name)

    def test_numpy_reads_generate_with_the_right_shapes_and_dtypes(self):
        stored = {"f64": np.float64, "f32": np.float32, "f16": np.float16, "bf16": np.uint16}
        for dtype, npdtype in stored.items():
            d = self.generate(dtype, "--dtype", dtype)
            load = lambda f: np.load(os.path.join(d, f + ".npy"))
            self.assertEqual(load("q").shape, (115, 4, 16))
            self.assertEqual(load("k").shape, (115, 2, 16))
            self.assertEqual(load("q").dtype, npdtype)
            self.assertEqual(load("out").dtype, npdtype)
            self.assertEqual(load("out_f64").dtype, np.float64)
            self.assertEqual(load("lse").dtype, np.float64 if dtype == "f64" else np.float32)
            self.assertEqual(load("lse").shape, (115, 4))
            self.assertEqual(load("cu_seqlens").tolist(), [0, 70, 70, 115])
            sel = load("selected")
            self.assertEqual((sel.shape, sel.dtype), ((115, 4, 3), np.int32))
            # Ascending, padded with -1, always holding the current block.
            for row in sel.reshape(-1, 3)[:5]:
                valid = row[row >= 0]
                self.assertTrue(np.all(np.diff(valid) > 0))
            meta = json.loads(pathlib.Path(d, "meta.json").read_text())
            self.assertEqual((meta["dtype"], meta["top_k"], meta["backend"]), (dtype, 3, "reference"))

    def test_out_f64_is_softmax_attention_over_the_selected_blocks(self):
        d = self.generate("g", "--dtype", "f64")
        q, k, v = (np.load(os.path.join(d, f + ".npy")) for f in "qkv")
        sel, out = np.load(os.path.join(d, "selected.npy")), np.load(os.path.join(d, "out_f64.npy"))
        i, h = 69, 3  # last token of the first sequence, whose current block is 4
        keys = [t for b in sel[i, h] if b >= 0 for t in range(b * 16, min(b * 16 + 16, i + 1))]
        logits = k[keys, h // 2] @ q[i, h] / 4.0
        p = np.exp(logits - logits.max())
        np.testing.assert_allclose(out[i, h], (p / p.sum()) @ v[keys, h // 2], rtol=1e-12)

    def test_run_reproduces_generate_bit_for_bit(self):
        for backend, mode in [("reference", "full"), ("cpu", "sparse")]:
            for dtype in ["f64", "f32", "f16", "bf16"]:
                name = f"{backend}-{dtype}"
                d = self.generate(name, "--dtype", dtype, "--mode", mode, "--backend", backend, "--grad")
                r = tool("run", *(f"--{x}={os.path.join(d, x + '.npy')}" for x in ["q", "k", "v", "dout"]),
                         "--cu-seqlens", os.path.join(d, "cu_seqlens.npy"), "--block-size", "16", "--top-k", "3",
                         "--mode", mode, "--backend", backend, "--out", self.path(name + "-run"))
                self.assertEqual(r.returncode, 0, r.stderr)
                for f in ["out", "lse", "selected", "out_f64", "dq", "dk", "dv", "dq_f64", "dk_f64", "dv_f64"]:
                    a = pathlib.Path(d, f + ".npy").read_bytes()
                    b = pathlib.Path(self.path(name + "-run", f + ".npy")).read_bytes()
                    self.assertEqual(a, b, f"{name} {f}")
                check = tool("check", "--expected", d, "--actual", os.path.join(d, "out.npy"))
                self.assertEqual(check.returncode, 0, check.stdout)

    def test_run_accepts_numpy_written_f64_inputs_for_every_dtype(self):
        rng = np.random.default_rng()
        for name, shape in [("q", (40, 2, 8)), ("k", (60, 1, 8)), ("v", (60, 1, 8))]:
            np.save(self.path(name + ".npy"), rng.standard_normal(shape))
        np.save(self.path("cq.npy"), np.array([0, 10, 40], dtype=np.int64))
        np.save(self.path("ck.npy"), np.array([0, 25, 60], dtype=np.int32))
        for dtype in ["f64", "f32", "f16", "bf16"]:
            r = tool("run", "--q", self.path("q.npy"), "--k", self.path("k.npy"), "--v", self.path("v.npy"),
                     "--cu-seqlens", self.path("cq.npy"), "--cu-seqlens-k", self.path("ck.npy"), "--dtype", dtype,
                     "--block-size", "8", "--top-k", "2", "--out", self.path("o-" + dtype))
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(np.load(self.path("o-" + dtype, "out.npy")).shape, (40, 2, 8))

    def test_check_passes_exact_and_fails_perturbed(self):
        d = self.generate("g", "--dtype", "f32")
        r = tool("check", "--expected", d, "--actual", os.path.join(d, "out.npy"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("relative error", r.stdout)
        out = np.load(os.path.join(d, "out.npy"))
        out[17, 2, 5] += 1e-3
        np.save(self.path("bad.npy"), out)
        r = tool("check", "--expected", d, "--actual", self.path("bad.npy"))
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("token 17, head 2, dim 5", r.stdout)
        self.assertEqual(tool("check", "--expected", d, "--actual", self.path("bad.npy"), "--tol", "1").returncode, 0)
        r = tool("check", "--expected", d, "--actual", os.path.join(d, "lse.npy"), "--what", "lse")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def assert_bad(self, args, needle):
        out = self.path("never")
        r = tool(*args, "--out", out) if args[0] != "check" else tool(*args)
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn(needle, r.stderr)
        self.assertFalse(os.path.exists(out))
        self.assertEqual([f for f in os.listdir(self.dir) if "tmp" in f], [])

    def test_bad_input_exits_2_and_leaves_no_output(self):
        d = self.generate("g")
        run = lambda **files: ["run", *(f"--{x}={files.get(x, os.path.join(d, x + '.npy'))}" for x in "qkv"),
                               "--cu-seqlens", files.get("cu", os.path.join(d, "cu_seqlens.npy")),
                               "--block-size", "16", "--top-k", "3"]
        self.assert_bad(run(q=self.path("missing.npy")), "cannot open")
        pathlib.Path(self.path("junk.npy")).write_bytes(b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f4', 'shape': (3")
        self.assert_bad(run(q=self.path("junk.npy")), "truncated")
        np.save(self.path("int.npy"), np.zeros((115, 4, 16), dtype=np.int16) + 1)
        self.assert_bad(run(q=self.path("int.npy")), "unsupported dtype '<i2'")
        np.save(self.path("f16.npy"), np.ones((115, 4, 16), dtype=np.float16))
        self.assert_bad(run(q=self.path("f16.npy")), "k.npy has dtype <f4 but --dtype f16 needs <f2")
        np.save(self.path("2d.npy"), np.ones((115, 64), dtype=np.float32))
        self.assert_bad(run(q=self.path("2d.npy")), "must be [tokens, heads, dim]")
        np.save(self.path("cu_bad.npy"), np.array([0, 80, 60, 115], dtype=np.int32))
        self.assert_bad(run(cu=self.path("cu_bad.npy")), "cu_seqlens_q decreases")
        np.save(self.path("cu_short.npy"), np.array([0, 100], dtype=np.int32))
        self.assert_bad(run(cu=self.path("cu_short.npy")), "ends at 100 but --q")
        self.assert_bad(gen(top_k="0"), "--top-k = '0'")
        self.assert_bad(gen(kv_heads="3"), "Hq % Hkv != 0")
        self.assert_bad([*GEN, "--no-such-option"], "no-such-option")
        self.assert_bad(gen(seqlens="2000000000,2000000000"), "more than 2^31 - 1 tokens")
        self.assert_bad(gen(seqlens="200000"), "use moba::cpu for long sequences")
        self.assert_bad(["check", "--expected", d, "--actual", os.path.join(d, "lse.npy")], "has shape [115, 4]")
        # An existing --out folder is never overwritten.
        r = tool(*GEN, "--out", d)
        self.assertEqual(r.returncode, 2)
        self.assertIn("already exists", r.stderr)

    def test_help_for_each_subcommand(self):
        for sub in ["generate", "run", "check"]:
            r = tool(sub, "--help")
            self.assertEqual(r.returncode, 0)
            self.assertIn("--", r.stdout)

    def assert_one_line(self, r, *needles):
        """Exit 2 with exactly one line on stderr holding every needle, and nothing left in the folder."""
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
        for needle in needles:
            self.assertIn(needle, r.stderr)
        try:
            self.assertEqual([f for f in os.listdir(self.dir) if "tmp" in f or f == "never"], [])
        finally:  # so that one failure does not spill into the next subtest
            shutil.rmtree(self.path("never"), ignore_errors=True)

    def test_every_bad_option_exits_2_with_one_line_naming_it_and_the_value(self):
        d = self.generate("g")
        check = ["check", "--expected", d, "--actual", os.path.join(d, "out.npy")]
        never = ["--out", self.path("never")]
        cases = [(check + ["--tol", t], "--tol", t) for t in ["-1", "nan", "inf", "-inf", "", "1e-3x", " 1"]]
        cases += [(gen(seed=x) + never, "--seed", x) for x in ["-1", "18446744073709551616", "1e3", "0x10", ""]]
        cases += [(gen(seqlens=x) + never, "--seqlens", x) for x in ["1,,2", ",1", "1,", "", "-5", "1;2", "2147483648"]]
        cases += [(gen(seqlens="2147483647,1") + never, "--seqlens", "2147483647,1")]
        for x in ["0", "-3", "1.5", "0x10", " 4", "99999999999999999999", ""]:
            cases.append((gen(block_size=x) + never, "--block-size", x))
        for option in ["top-k", "q-heads", "kv-heads", "head-dim"]:  # the same parser: a sample
            for x in ["0", "1.5", "99999999999999999999"]:
                cases.append((gen(**{option: x}) + never, f"--{option}", x))
        cases += [(gen(scale=x) + never, "--scale", x) for x in ["nan", "inf", "", "1/8"]]
        cases += [(gen() + ["--out", ""], "--out", "")]
        cases += [(gen(dtype="f8") + never, "--dtype", "f8"), (gen(mode="dense") + never, "--mode", "dense")]
        for args, option, value in cases:
            with self.subTest(args=args):
                self.assert_one_line(tool(*args), option, f"{value}")

    def test_run_checks_every_input_file_against_the_views_built_on_it(self):
        rng = np.random.default_rng()
        arrays = {"q": (400, 4, 16), "k8": (400, 2, 8), "k": (400, 2, 16), "k300": (300, 2, 16), "k_rank2": (400, 32),
                  "k_rank4": (400, 2, 16, 1), "q0heads": (400, 0, 16), "q0dim": (400, 4, 0), "k3heads": (400, 3, 16)}
        for name, shape in arrays.items():
            np.save(self.path(name + ".npy"), rng.standard_normal(shape).astype(np.float32))
        np.save(self.path("q_int.npy"), np.ones((400, 4, 16), dtype=np.int32))
        np.save(self.path("v_f16.npy"), np.ones((400, 2, 16), dtype=np.float16))
        for name, cu in {"cu": [0, 400], "cu3": [0, 100, 300], "cu2d": [[0, 400]], "cu_empty": [],
                         "cu_big": [0, 1 << 31]}.items():
            np.save(self.path(name + ".npy"), np.array(cu, dtype=np.int64))
        np.save(self.path("cu_f4.npy"), np.array([0, 400], dtype=np.float32))
        p = lambda name: self.path(name + ".npy")

        def run(q="q", k="k", v="k", cu="cu", cu_k=None):
            extra = ["--cu-seqlens-k", p(cu_k)] if cu_k else []
            return ["run", "--q", p(q), "--k", p(k), "--v", p(v), "--cu-seqlens", p(cu), *extra,
                    "--block-size", "16", "--top-k", "2", "--out", self.path("never")]

        cases = [  # the adversarial run's example, then one per check
            (run(k="k8", v="k8"), [p("k8"), "[400, 2, 8]", "[400, 4, 16]", "head dims"]),
            (run(v="k8"), [p("k8"), "[400, 2, 8]", "[400, 2, 16]", "must match"]),
            (run(k="k300", v="k300"), [p("k300"), "[300, 2, 16]", "ends at 400"]),
            (run(k="k_rank2"), [p("k_rank2"), "[400, 32]", "[tokens, heads, dim]"]),
            (run(k="k_rank4"), [p("k_rank4"), "[400, 2, 16, 1]"]),
            (run(q="q0heads"), [p("q0heads"), "[400, 0, 16]", ">= 1"]),
            (run(q="q0dim", k="q0dim", v="q0dim"), [p("q0dim"), "[400, 4, 0]"]),
            (run(q="q_int"), [p("q_int"), "<i4"]),
            (run(v="v_f16"), [p("v_f16"), "<f2", "--dtype f32 needs <f4"]),
            (run(cu="cu3"), [p("cu3"), "ends at 300", p("q"), "[400, 4, 16]"]),
            (run(cu_k="cu3"), [p("cu"), p("cu3"), "2 entries", "has 3"]),
            (run(cu="cu2d"), [p("cu2d"), "[1, 2]"]),
            (run(cu="cu_empty"), [p("cu_empty"), "[0]"]),
            (run(cu="cu_f4"), [p("cu_f4"), "<f4"]),
            (run(cu="cu_big"), [p("cu_big"), "2147483648", "out of range"]),
            (run(k="k3heads", v="k3heads"), ["Hq % Hkv != 0"]),
        ]
        for args, needles in cases:
            with self.subTest(args=args):
                self.assert_one_line(tool(*args), *needles)
        self.assertEqual(tool(*run()[:-1], self.path("ok")).returncode, 0)

    def test_npy_headers_numpy_never_writes_are_refused(self):
        d = self.generate("g")
        q = np.load(os.path.join(d, "q.npy"))
        data = q.tobytes()
        dict_ = "{'descr': '<f4', 'fortran_order': False, 'shape': (115, 4, 16), "
        cases = {
            "twice": ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'shape': (115, 4, 16), }", data,
                      "duplicate key 'shape'"),
            "garbage": (dict_ + "} x", data, "after the dictionary"),
            "two_dicts": (dict_ + "}{}", data, "after the dictionary"),
            "no_shape": ("{'descr': '<f4', 'fortran_order': False, }", data, "lacks shape"),
            "no_descr": ("{'fortran_order': False, 'shape': (115, 4, 16), }", data, "lacks descr"),
            "long": (dict_ + "}", data + b"\0", f"data holds more than {len(data)} bytes"),
            "short": (dict_ + "}", data[:-1], f"data holds {len(data) - 1} bytes"),
            "overflow": ("{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 1), }", b"",
                         "overflows 64 bits"),
        }
        for name, (header, payload, needle) in cases.items():
            with self.subTest(name=name):
                save_raw(self.path(name + ".npy"), header.encode(), payload)
                r = tool("run", "--q", self.path(name + ".npy"), *(f"--{x}={os.path.join(d, x + '.npy')}" for x in "kv"),
                         "--cu-seqlens", os.path.join(d, "cu_seqlens.npy"), "--block-size", "16", "--top-k", "3",
                         "--out", self.path("never"))
                self.assert_one_line(r, self.path(name + ".npy"), needle)
        # Not files at all: an endless stream (read whole, it would exhaust memory) and a folder.
        for q, needle in [("/dev/zero", "bad magic"), (self.dir, "Is a directory")]:
            with self.subTest(q=q):
                r = tool("run", "--q", q, *(f"--{x}={os.path.join(d, x + '.npy')}" for x in "kv"),
                         "--cu-seqlens", os.path.join(d, "cu_seqlens.npy"), "--block-size", "16", "--top-k", "3",
                         "--out", self.path("never"))
                self.assert_one_line(r, "--q", q, needle)

    def test_a_full_disk_fails_naming_the_file_and_leaves_nothing(self):
        tiny = gen(seqlens="1", q_heads="1", kv_heads="1", head_dim="1")  # each file fits a stdio buffer
        cases = [(tiny, 0, "q.npy"),  # fails only at the flush or the close
                 (tiny, 200, "meta.json"),  # every .npy fits under 200 bytes; meta.json, written last, does not
                 (GEN, 4096, "q.npy")]  # fails in the middle of the data
        for args, limit, file in cases:
            for ignore in [True, False]:  # SIGXFSZ ignored (write returns EFBIG) or left to kill
                with self.subTest(args=args, limit=limit, ignore=ignore):
                    r = tool(*args, "--out", self.path("never"), preexec_fn=file_size_limit(limit, ignore))
                    self.assert_one_line(r, "cannot write", file, "File too large")
        d = self.generate("g")
        r = tool("run", *(f"--{x}={os.path.join(d, x + '.npy')}" for x in "qkv"), "--cu-seqlens",
                 os.path.join(d, "cu_seqlens.npy"), "--block-size", "16", "--top-k", "3", "--out", self.path("never"),
                 preexec_fn=file_size_limit(4096, True))
        self.assert_one_line(r, "cannot write", "out.npy")

    def test_a_report_that_cannot_be_written_exits_2(self):
        d = self.generate("g")
        with open("/dev/full", "w") as full:
            r = subprocess.run([TOOL, "check", "--expected", d, "--actual", os.path.join(d, "out.npy")], stdout=full,
                               stderr=subprocess.PIPE, text=True)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("standard output", r.stderr)

    def start_slow(self, out, args=SLOW, **kwargs):
        """Starts a run and returns it once its temporary folder exists."""
        p = subprocess.Popen([TOOL, *args, "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             **kwargs)
        tmp = f"{out}.tmp-{p.pid}"
        deadline = time.monotonic() + 60
        while not os.path.isdir(tmp):
            self.assertIsNone(p.poll(), "the run ended before its temporary folder appeared")
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.005)
        return p, tmp

    def test_interruptions_remove_the_temporary_folder_and_the_parents_made_for_it(self):
        for sig in [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]:
            with self.subTest(sig=sig):
                p, tmp = self.start_slow(self.path("a", "b", "out"))
                time.sleep(0.2)  # into the computation
                p.send_signal(sig)
                _, err = p.communicate(timeout=60)
                self.assertEqual(p.returncode, -sig, err)  # died of the signal: 128 + sig in a shell
                self.assertEqual(os.listdir(self.dir), [])

    def test_a_signal_ignored_by_the_caller_stays_ignored(self):
        p, tmp = self.start_slow(self.path("out"), gen(seqlens="800,800"),
                                 preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        p.send_signal(signal.SIGHUP)
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 0, err)
        self.assertEqual(os.listdir(self.dir), ["out"])

    def test_an_out_created_meanwhile_is_never_replaced(self):
        out = self.path("out")
        p, tmp = self.start_slow(out, gen(seqlens="800,800"))
        os.mkdir(out)  # an empty folder: plain rename(2) would replace it
        _, err = p.communicate(timeout=120)
        self.assertEqual(p.returncode, 2, err)
        self.assertIn("created by someone else", err)
        self.assertEqual(os.listdir(self.dir), ["out"])
        self.assertEqual(os.listdir(out), [])

    def test_the_next_run_removes_the_leftover_of_a_killed_one(self):
        out = self.path("out")
        p, tmp = self.start_slow(out)
        p.kill()
        p.communicate()
        self.assertTrue(os.path.isdir(tmp))  # SIGKILL leaves no chance to clean up
        alive = f"{out}.tmp-{os.getpid()}"  # a process that runs: reported, left alone
        unrelated = [f"{out}.tmp-12ab", f"{out}.tmp-", self.path("other.tmp-1")]
        for path in [alive, *unrelated]:
            os.mkdir(path)
        r = tool(*GEN, "--out", out)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(f"removed {tmp}", r.stderr)
        self.assertIn(f"{alive} belongs to process {os.getpid()}", r.stderr)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(os.path.basename(x) for x in [out, alive, *unrelated]))

    def test_a_failure_after_the_folder_was_made_removes_it_and_its_parents(self):
        for args, needle in [(gen(kv_heads="3"), "Hq % Hkv != 0"), (gen(top_k="3000000000000"), "--top-k")]:
            with self.subTest(args=args):
                r = tool(*args, "--out", self.path("a", "b", "out"))
                self.assert_one_line(r, needle)
                self.assertEqual(os.listdir(self.dir), [])

    def test_out_with_a_trailing_slash_is_the_folder_itself(self):
        r = tool(*GEN, "--out", self.path("out") + "//")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(os.listdir(self.dir), ["out"])
        self.assertIn("meta.json", os.listdir(self.path("out")))

    def test_check_refuses_an_expected_folder_it_cannot_trust(self):
        d = self.generate("g")
        meta = json.loads(pathlib.Path(d, "meta.json").read_text())
        out64 = np.load(os.path.join(d, "out_f64.npy"))

        def folder(name, meta_text=None, out_f64=None):
            f = self.path(name)
            os.mkdir(f)
            pathlib.Path(f, "meta.json").write_text(meta_text if meta_text is not None else json.dumps(meta))
            np.save(os.path.join(f, "out_f64.npy"), out_f64 if out_f64 is not None else out64)
            return f

        nan = out64.copy()
        nan[3, 1, 2] = np.nan
        cases = {  # heads x dim = 0 was a SIGFPE
            "zero_heads": (json.dumps(dict(meta, q_heads=0)), np.zeros((115, 0, 16)), "q_heads = 0"),
            "zero_dim": (json.dumps(dict(meta, head_dim=0)), np.zeros((115, 4, 0)), "head_dim = 0"),
            "bad_dtype": (json.dumps(dict(meta, dtype="f8")), None, "dtype = \"f8\""),
            "dtype_not_text": (json.dumps(dict(meta, dtype=32)), None, "dtype = 32"),
            "heads_text": (json.dumps(dict(meta, q_heads="4")), None, "q_heads = \"4\""),
            "not_json": ("{", None, "meta.json"),
            "a_list": ("[]", None, "meta.json"),
            "no_cu": (json.dumps({k: v for k, v in meta.items() if k != "cu_seqlens_q"}), None, "cu_seqlens_q"),
            "shape_vs_meta": (None, out64[:, :2], "[115, 2, 16]"),
            "f4": (None, out64.astype(np.float32), "<f4"),
            "nan": (None, nan, "nan"),
        }
        for name, (meta_text, expected, needle) in cases.items():
            with self.subTest(name=name):
                f = folder(name, meta_text, expected)
                actual = self.path(name + "_actual.npy")
                np.save(actual, np.load(os.path.join(f, "out_f64.npy")).astype(np.float32))
                self.assert_one_line(tool("check", "--expected", f, "--actual", actual), needle)
        np.save(self.path("int.npy"), out64.astype(np.int32))
        self.assert_one_line(tool("check", "--expected", d, "--actual", self.path("int.npy")), "int.npy", "<i4")
        # An empty folder (every sequence of length 0) has nothing to compare, and passes.
        e = self.path("empty")
        self.assertEqual(tool(*gen(seqlens="0,0"), "--out", e).returncode, 0)
        r = tool("check", "--expected", e, "--actual", os.path.join(e, "out.npy"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("no elements", r.stdout)
        r = tool("run", *(f"--{x}={os.path.join(e, x + '.npy')}" for x in "qkv"), "--cu-seqlens",
                 os.path.join(e, "cu_seqlens.npy"), "--block-size", "16", "--top-k", "3", "--out", self.path("empty-run"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(np.load(self.path("empty-run", "out.npy")).shape, (0, 4, 16))


    def test_grad_files_are_the_backward_of_the_forward(self):
        """dq, dk, dv (_f64 and the dtype's) against a NumPy backward with the selection held fixed,
        itself checked by finite differences; generate and run with q_len < k_len and GQA."""
        seed = fresh_seed()
        with self.subTest(seed=seed):
            rng = np.random.default_rng(seed)
            d = self.path("g")
            r = tool(*gen(dtype="f32"), "--grad", "--seed", str(seed), "--out", d)
            self.assertEqual(r.returncode, 0, r.stderr)
            # Own inputs, chunked prefill (q_len < k_len), kv heads shared by 3 query heads.
            for name, shape in [("q", (50, 3, 8)), ("k", (90, 1, 8)), ("v", (90, 1, 8)), ("dout", (50, 3, 8))]:
                np.save(self.path(name + ".npy"), rng.standard_normal(shape))
            np.save(self.path("cq.npy"), np.array([0, 20, 50], dtype=np.int32))
            np.save(self.path("ck.npy"), np.array([0, 40, 90], dtype=np.int32))
            o = self.path("o")
            r = tool("run", *(f"--{x}={self.path(x + '.npy')}" for x in ["q", "k", "v", "dout"]),
                     "--cu-seqlens", self.path("cq.npy"), "--cu-seqlens-k", self.path("ck.npy"), "--dtype", "f64",
                     "--block-size", "8", "--top-k", "2", "--out", o)
            self.assertEqual(r.returncode, 0, r.stderr)
            for folder, inputs, cu_k in [(d, d, "cu_seqlens.npy"), (o, self.dir, "ck.npy")]:
                meta = json.loads(pathlib.Path(folder, "meta.json").read_text())
                load = lambda f, at=folder: as_f64(np.load(os.path.join(at, f + ".npy")))
                q, k, v, dout = (load(x, inputs) for x in ["q", "k", "v", "dout"])
                cu_q = np.load(os.path.join(inputs, "cu_seqlens.npy" if folder == d else "cq.npy"))
                cu_k = np.load(os.path.join(inputs, cu_k))
                sel = np.load(os.path.join(folder, "selected.npy"))
                args = (cu_q, cu_k, sel, meta["block_size"], meta["softmax_scale"])
                out, dq, dk, dv = numpy_moba(q, k, v, dout, *args)
                np.testing.assert_allclose(load("out_f64"), out, rtol=1e-9, atol=1e-12)
                for name, want in [("dq", dq), ("dk", dk), ("dv", dv)]:
                    got = load(name + "_f64")
                    self.assertLess(np.linalg.norm(got - want) / np.linalg.norm(want), 1e-10, f"{folder} {name}")
                    got = load(name)  # the dtype's, within SPEC's gradient bound
                    self.assertLess(np.linalg.norm(got - want) / np.linalg.norm(want), 1e-5, f"{folder} {name}")
                # The NumPy backward is the derivative of sum(dout * out): central differences on a few elements.
                loss = lambda q_, k_, v_: np.sum(dout * numpy_moba(q_, k_, v_, dout, *args)[0])
                for x, grad, which in [(q, dq, 0), (k, dk, 1), (v, dv, 2)]:
                    for _ in range(3):
                        at = tuple(rng.integers(0, n) for n in x.shape)
                        plus, minus = [q.copy(), k.copy(), v.copy()], [q.copy(), k.copy(), v.copy()]
                        plus[which][at] += 1e-6
                        minus[which][at] -= 1e-6
                        fd = (loss(*plus) - loss(*minus)) / 2e-6
                        self.assertAlmostEqual(fd, grad[at], delta=1e-5 * (1 + abs(fd)), msg=f"{which} {at}")

    def test_grad_leaves_the_forward_files_as_they_were(self):
        seed = fresh_seed()
        with self.subTest(seed=seed):
            for name, extra in [("plain", []), ("grad", ["--grad"])]:
                r = tool(*GEN, *extra, "--seed", str(seed), "--out", self.path(name))
                self.assertEqual(r.returncode, 0, r.stderr)
            for f in ["q", "k", "v", "out", "out_f64", "lse", "selected"]:
                self.assertEqual(pathlib.Path(self.path("plain", f + ".npy")).read_bytes(),
                                 pathlib.Path(self.path("grad", f + ".npy")).read_bytes(), f)
            self.assertFalse(os.path.exists(self.path("plain", "dq.npy")))

    def test_check_gradients_pass_their_bound_and_fail_perturbed(self):
        seed = fresh_seed()
        with self.subTest(seed=seed):
            for backend, dtype, bound in [("reference", "bf16", "2.0e-02"), ("cpu", "f32", "1.0e-05")]:
                d = self.path(backend)
                r = tool(*gen(dtype=dtype, backend=backend), "--grad", "--seed", str(seed), "--out", d)
                self.assertEqual(r.returncode, 0, r.stderr)
                for what in ["out", "lse", "dq", "dk", "dv"]:
                    r = tool("check", "--expected", d, "--actual", os.path.join(d, what + ".npy"), "--what", what)
                    self.assertEqual(r.returncode, 0, f"{backend} {what}: {r.stdout}{r.stderr}")
                    if what.startswith("d"):
                        self.assertIn(f"tolerance {bound}, SPEC bound for {dtype}", r.stdout)
            dk = np.load(self.path("cpu", "dk_f64.npy"))
            dk[33, 1, 9] += 1e-2 * np.linalg.norm(dk)
            np.save(self.path("bad.npy"), dk)
            r = tool("check", "--expected", self.path("cpu"), "--actual", self.path("bad.npy"), "--what", "dk")
            self.assertEqual(r.returncode, 1, r.stdout)
            self.assertIn("key token 33, kv head 1, dim 9", r.stdout)

    def test_bad_gradient_inputs_exit_2_with_one_line(self):
        d = self.generate("g")  # no --grad
        g = self.path("gg")
        self.assertEqual(tool(*GEN, "--grad", "--out", g).returncode, 0)
        check = lambda folder, actual, what: tool("check", "--expected", folder, "--actual", actual, "--what", what)
        self.assert_one_line(check(d, os.path.join(d, "out.npy"), "dq"), "has no dq_f64.npy", "--grad")
        self.assert_one_line(check(g, os.path.join(g, "dq.npy"), "dk"), "[115, 4, 16]", "[115, 2, 16]")
        self.assert_one_line(check(g, os.path.join(g, "dk.npy"), "dz"), "--what", "dz")
        self.assert_one_line(check(g, self.path("missing.npy"), "dv"), "missing.npy", "cannot open")
        meta = json.loads(pathlib.Path(g, "meta.json").read_text())
        del meta["kv_heads"]
        pathlib.Path(g, "meta.json").write_text(json.dumps(meta))
        self.assert_one_line(check(g, os.path.join(g, "dk.npy"), "dk"), "kv_heads")
        run = ["run", *(f"--{x}={os.path.join(d, x + '.npy')}" for x in "qkv"), "--cu-seqlens",
               os.path.join(d, "cu_seqlens.npy"), "--block-size", "16", "--top-k", "3", "--out", self.path("never")]
        self.assert_one_line(tool(*run, "--dout", os.path.join(d, "k.npy")), "--dout", "[115, 2, 16]", "must match")
        self.assert_one_line(tool(*run, "--dout", self.path("missing.npy")), "--dout", "cannot open")

    def test_plot_draws_what_selected_npy_holds(self):
        seed = fresh_seed()
        with self.subTest(seed=seed):
            d = self.path("g")
            r = tool(*gen(seqlens="70,0,45,33", q_heads="4", kv_heads="2"), "--seed", str(seed), "--out", d)
            self.assertEqual(r.returncode, 0, r.stderr)
            sel, cu = np.load(os.path.join(d, "selected.npy")), np.load(os.path.join(d, "cu_seqlens.npy"))
            for name, from_, extra, max_rows, head in [("all", d, [], 1000, None), ("binned", d, [], 10, None),
                                                      ("head", d, ["--head", "2"], 7, 2),
                                                      ("bare", os.path.join(d, "selected.npy"), [], 1000, None)]:
                svg = self.path(name + ".svg")
                r = tool("plot", "--from", from_, "--out", svg, "--max-rows", str(max_rows), *extra)
                self.assertEqual(r.returncode, 0, r.stderr)
                cells, trace, texts, plot = svg_map(svg)
                bare = name == "bare"
                want = expected_map(sel, [0, sel.shape[0]] if bare else cu, max_rows, head)
                self.assertEqual(sorted(cells), sorted(want), name)
                for key, share in want.items():
                    self.assertAlmostEqual(cells[key], share, delta=1e-4, msg=f"{name} {key}")
                # The trace passes through each row's current block: its first and its last token's.
                current = sel.max(axis=(1, 2))
                self.assertTrue(trace)
                for t, block in trace:
                    near = [current[x] for x in [t - 1, t] if 0 <= x < len(current)]  # a row's start or end
                    self.assertTrue(any(abs(block - c) < 1e-3 for c in near), (name, t, block))
                self.assertEqual(int(plot.get("data-blocks")), 5)  # 70 tokens: blocks 0..4
                for label in ["key block", "query token", "current block (causal part)", "share of the row's queries"]:
                    self.assertTrue(any(label in x for x in texts), (name, label))
                self.assertTrue(any(("head 2" if head == 2 else "all 4 heads") in x for x in texts), name)

    def test_stats_match_numpy_on_random_and_planted_ties(self):
        seed = fresh_seed()
        with self.subTest(seed=seed):
            rng = np.random.default_rng(seed)
            d = self.path("g")
            r = tool(*gen(dtype="f32", seqlens="100,0,57", top_k="3"), "--seed", str(seed), "--out", d)
            self.assertEqual(r.returncode, 0, r.stderr)
            # Own inputs (q_len < k_len in the second sequence) with blocks 0 and 1 of every sequence
            # holding the same keys: their scores tie exactly for every query, the gate must break the tie.
            q, k, v = (rng.standard_normal((n, h, 16)).astype(np.float32) for n, h in [(110, 2), (150, 1), (150, 1)])
            for start in [0, 80]:
                k[start + 16:start + 32] = k[start:start + 16]
            o = self.path("o")
            files = {"q": q, "k": k, "v": v, "cq": np.array([0, 80, 110], np.int32), "ck": np.array([0, 80, 150], np.int32)}
            for name, x in files.items():
                np.save(self.path(name + ".npy"), x)
            r = tool("run", *(f"--{x}={self.path(x + '.npy')}" for x in "qkv"), "--cu-seqlens", self.path("cq.npy"),
                     "--cu-seqlens-k", self.path("ck.npy"), "--block-size", "16", "--top-k", "2", "--out", o)
            self.assertEqual(r.returncode, 0, r.stderr)
            r = tool("stats", "--from", o)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("near-ties: not computed", r.stdout)  # run writes no q.npy, k.npy
            shutil.copy(self.path("q.npy"), o)
            shutil.copy(self.path("k.npy"), o)
            for folder, cu_q, cu_k, block, top_k in [(d, [0, 100, 100, 157], [0, 100, 100, 157], 16, 3),
                                                     (o, files["cq"], files["ck"], 16, 2)]:
                r = tool("stats", "--from", folder)
                self.assertEqual(r.returncode, 0, r.stderr)
                got, sel = parse_stats(r.stdout), np.load(os.path.join(folder, "selected.npy"))
                want = numpy_stats(sel, np.array(cu_q), np.array(cu_k), block)
                for key in ["blocks", "table", "pairs"]:
                    self.assertEqual(got[key], want[key], f"{folder} {key}\n{r.stdout}")
                qf, kf = (np.load(os.path.join(folder, x + ".npy")).astype(np.float64) for x in "qk")
                ties = numpy_near_ties(qf, kf, np.array(cu_q), np.array(cu_k), block, top_k, 6e-8)
                self.assertEqual(tuple(got["ties"]), ties, r.stdout)
            self.assertGreater(ties[0], ties[1] // 10, "the planted ties were not seen")
            self.assertEqual(got["table"][1][1], 0, "an exact tie goes to the lower block, 0")
            # A bare selected.npy: the block-level numbers only.
            r = tool("stats", "--from", os.path.join(d, "selected.npy"))
            self.assertEqual(r.returncode, 0, r.stderr)
            got, want = parse_stats(r.stdout), numpy_stats(np.load(os.path.join(d, "selected.npy")),
                                                          np.array([0, 157]), np.array([0, 157]), 16)
            self.assertEqual(got["blocks"], [want["blocks"][0], parse_stats(tool("stats", "--from", d).stdout)["blocks"][1]])
            self.assertNotIn("pairs", got)

    def test_bad_selections_exit_2_and_leave_no_svg(self):
        d = self.generate("g")
        sel = np.load(os.path.join(d, "selected.npy"))
        cases = {"descending": (sel[:, :, ::-1], "token 0, head 0"),
                 "hole": (np.array([[[0, -1, 2]]], np.int32), "expected ascending blocks"),
                 "int64": (sel.astype(np.int64), "<i8"), "two_d": (sel[:, 0], "[115, 3]")}
        mixed = np.full((2, 2, 1), 0, np.int32)
        mixed[1, 1, 0] = 1  # the heads of token 1 disagree about its current block
        cases["mixed"] = (mixed, "token 1, head 1")
        for name, (array, needle) in cases.items():
            np.save(self.path(name + ".npy"), np.ascontiguousarray(array))
            for command in ["stats", "plot"]:
                with self.subTest(name=name, command=command):
                    extra = ["--out", self.path("never")] if command == "plot" else []
                    self.assert_one_line(tool(command, "--from", self.path(name + ".npy"), *extra), needle)
        bad_meta = self.path("bad_meta")
        shutil.copytree(d, bad_meta)
        meta = json.loads(pathlib.Path(bad_meta, "meta.json").read_text())
        pathlib.Path(bad_meta, "meta.json").write_text(json.dumps(dict(meta, block_size=32)))
        never = ["--out", self.path("never")]
        self.assert_one_line(tool("stats", "--from", bad_meta), "ending at its current block")
        pathlib.Path(bad_meta, "meta.json").write_text(json.dumps(dict(meta, q_heads=2, kv_heads=1)))
        self.assert_one_line(tool("plot", "--from", bad_meta, "--out", self.path("never")), "q_heads = 2")
        self.assert_one_line(tool("plot", "--from", d, "--head", "4", *never), "--head = '4'", "4 heads")
        self.assert_one_line(tool("plot", "--from", d, "--max-rows", "0", *never), "--max-rows = '0'")
        self.assert_one_line(tool("plot", "--from", self.path("missing"), *never), "missing", "cannot open")
        self.assert_one_line(tool("stats", "--from", self.dir), "meta.json")
        existing = self.path("map.svg")
        pathlib.Path(existing).write_text("mine")
        r = tool("plot", "--from", d, "--out", existing)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(pathlib.Path(existing).read_text(), "mine")
        self.assertEqual([f for f in os.listdir(self.dir) if "tmp" in f], [])

if __name__ == "__main__":
    unittest.main()
