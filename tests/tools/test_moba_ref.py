#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""moba-ref end to end: NumPy reads what it writes, run reproduces generate bit for bit, check
catches a perturbation, and every bad input exits 2 leaving no output behind."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import unittest

import numpy as np

TOOL = sys.argv.pop(1)
GEN_OPTIONS = {"seqlens": "70,0,45", "q-heads": "4", "kv-heads": "2", "head-dim": "16", "block-size": "16",
               "top-k": "3"}


def gen(**changes):
    """The generate command line, with some options changed (top_k="0" sets --top-k 0)."""
    options = dict(GEN_OPTIONS, **{k.replace("_", "-"): v for k, v in changes.items()})
    return ["generate", *(x for k, v in options.items() for x in (f"--{k}", v))]


GEN = gen()


def tool(*args):
    return subprocess.run([TOOL, *args], capture_output=True, text=True)


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
                d = self.generate(name, "--dtype", dtype, "--mode", mode, "--backend", backend)
                r = tool("run", *(f"--{x}={os.path.join(d, x + '.npy')}" for x in "qkv"),
                         "--cu-seqlens", os.path.join(d, "cu_seqlens.npy"), "--block-size", "16", "--top-k", "3",
                         "--mode", mode, "--backend", backend, "--out", self.path(name + "-run"))
                self.assertEqual(r.returncode, 0, r.stderr)
                for f in ["out", "lse", "selected", "out_f64"]:
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
        self.assert_bad(run(cu=self.path("cu_short.npy")), "but the tensors hold 115")
        self.assert_bad(gen(top_k="0"), "top_k = 0")
        self.assert_bad(gen(kv_heads="3"), "Hq % Hkv != 0")
        self.assert_bad([*GEN, "--no-such-option"], "no-such-option")
        self.assert_bad(gen(seqlens="2000000000,2000000000"), "more than 2^31 - 1 tokens")
        self.assert_bad(gen(seqlens="200000"), "use moba::cpu for long sequences")
        self.assert_bad(["check", "--expected", d, "--actual", os.path.join(d, "lse.npy")], "has shape [115,4]")
        # An existing --out folder is never overwritten.
        r = tool(*GEN, "--out", d)
        self.assertEqual(r.returncode, 2)
        self.assertIn("already exists", r.stderr)

    def test_help_for_each_subcommand(self):
        for sub in ["generate", "run", "check"]:
            r = tool(sub, "--help")
            self.assertEqual(r.returncode, 0)
            self.assertIn("--", r.stdout)


if __name__ == "__main__":
    unittest.main()
