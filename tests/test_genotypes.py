"""Tests for e2rnas_tf.space.genotypes: derivation on hand-built weights, JSON
round-trips, every validation error and `get`."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from e2rnas_tf.space import genotypes as gt
from e2rnas_tf.space.ops import PRIMITIVES

P = {name: k for k, name in enumerate(PRIMITIVES)}
CONCAT = (2, 3, 4, 5)
VALID_OPS = [p for p in PRIMITIVES if p != "none"]


def weights_with(entries, rows=14):
    """A [rows, 8] matrix of zeros with ``{(row, op): value}`` set."""
    w = np.zeros((rows, len(PRIMITIVES)), np.float32)
    for (row, op), value in entries.items():
        w[row, P[op]] = value
    return w


# ---------------------------------------------------------------------------
# Derivation.

# Rows of the 14 edges: node 0 reads rows 0-1 (inputs 0, 1), node 1 rows
# 2-4 (inputs 0-2), node 2 rows 5-8 (inputs 0-3), node 3 rows 9-13 (0-4).
HAND_NORMAL = weights_with({
    # Node 0: both inputs kept, strongest edge first.
    (0, "skip_connect"): 0.5, (1, "sep_conv_3x3"): 0.9,
    # Node 1: 'none' is the strongest weight on input 0 and must be
    # ignored; input 0's best real op (0.1) loses to inputs 2 and 1.
    (2, "none"): 0.99, (2, "max_pool_3x3"): 0.1,
    (3, "dil_conv_5x5"): 0.6, (4, "avg_pool_3x3"): 0.7,
    # Node 2: a tie between inputs 0 and 1 (earlier input first); input 3
    # has a huge 'none' weight that does not count.
    (5, "sep_conv_5x5"): 0.4, (6, "sep_conv_5x5"): 0.4,
    (7, "dil_conv_3x3"): 0.3, (8, "none"): 0.95, (8, "skip_connect"): 0.05,
    # Node 3: a tie between two ops on one edge (earlier op wins).
    (10, "max_pool_3x3"): 0.75, (13, "sep_conv_3x3"): 0.8,
    (13, "dil_conv_3x3"): 0.8, (9, "avg_pool_3x3"): 0.01,
})
HAND_NORMAL_GENE = (
    ("sep_conv_3x3", 1), ("skip_connect", 0),
    ("avg_pool_3x3", 2), ("dil_conv_5x5", 1),
    ("sep_conv_5x5", 0), ("sep_conv_5x5", 1),
    ("sep_conv_3x3", 4), ("max_pool_3x3", 1),
)


def test_derive_hand_built_weights():
    # Reduction cell: every real op equal, 'none' dominant everywhere, so
    # every node keeps inputs 0 and 1 with the first real op.
    reduce_w = np.ones((14, 8), np.float32)
    reduce_w[:, P["none"]] = 5.0
    g = gt.derive(HAND_NORMAL, reduce_w)
    assert g.normal == HAND_NORMAL_GENE
    assert g.reduce == (("max_pool_3x3", 0), ("max_pool_3x3", 1)) * 4
    assert g.normal_concat == g.reduce_concat == CONCAT
    assert g.steps == 4


def test_derive_accepts_tensors_and_softmaxed_weights():
    w = tf.constant(HAND_NORMAL)
    assert gt.derive(w, w).normal == HAND_NORMAL_GENE
    # Softmax keeps the order within a row but not across rows: here node
    # 3's two kept edges come out in the other order (row 13's two equal
    # ops share its probability mass), the kept (op, input) set is equal.
    soft = tf.nn.softmax(w * 10.0, axis=-1)
    g = gt.derive(soft, soft)
    assert g.normal[:6] == HAND_NORMAL_GENE[:6]
    assert g.normal[6:] == HAND_NORMAL_GENE[7:5:-1]


def test_derive_multiplier_and_custom_primitives():
    g = gt.derive(HAND_NORMAL, HAND_NORMAL, multiplier=2)
    assert g.normal_concat == (4, 5)
    # Two nodes, no 'none' among the primitives: the first column counts.
    prims = ("skip_connect", "sep_conv_3x3")
    w = np.array([[0.9, 0.1], [0.2, 0.3], [0.1, 0.0], [0.0, 0.5],
                  [0.6, 0.7]], np.float32)
    g = gt.derive(w, w, primitives=prims, multiplier=2)
    assert g.normal == (("skip_connect", 0), ("sep_conv_3x3", 1),
                        ("sep_conv_3x3", 2), ("sep_conv_3x3", 1))
    assert g.normal_concat == (2, 3)


def test_derive_errors():
    with pytest.raises(ValueError, match="Expected two weight matrices of "
                       r"one shape.*Received: \(14, 8\) and \(14, 7\)"):
        gt.derive(np.zeros((14, 8)), np.zeros((14, 7)))
    with pytest.raises(ValueError, match="Expected 8 columns .* Received: 7"):
        gt.derive(np.zeros((14, 7)), np.zeros((14, 7)))
    with pytest.raises(ValueError, match="Expected a number of edges "
                       r"2 \+ 3 \+ .* Received: 6"):
        gt.derive(np.zeros((6, 8)), np.zeros((6, 8)))
    nan = HAND_NORMAL.copy()
    nan[3, 4] = np.nan
    with pytest.raises(ValueError, match="Expected finite op weights. "
                       "Received: non-finite values in weights_reduce"):
        gt.derive(HAND_NORMAL, nan)
    with pytest.raises(ValueError, match="Received: multiplier=5"):
        gt.derive(HAND_NORMAL, HAND_NORMAL, multiplier=5)
    with pytest.raises(ValueError, match=r"Received: primitives=\('none',\)"):
        gt.derive(np.zeros((5, 1)), np.zeros((5, 1)), primitives=("none",))


# ---------------------------------------------------------------------------
# Published genotypes and JSON.


def test_published_darts_genotypes():
    # As listed in the DARTS authors' genotypes.py.
    assert gt.PUBLISHED["DARTS_V2"].normal == (
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1), ("sep_conv_3x3", 1), ("skip_connect", 0),
        ("skip_connect", 0), ("dil_conv_3x3", 2))
    assert gt.PUBLISHED["DARTS_V2"].reduce == (
        ("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2),
        ("max_pool_3x3", 1), ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("max_pool_3x3", 1))
    assert gt.PUBLISHED["DARTS_V1"].normal[-1] == ("skip_connect", 2)
    assert gt.PUBLISHED["DARTS_V1"].reduce[-1] == ("avg_pool_3x3", 0)
    for g in gt.PUBLISHED.values():
        assert g.normal_concat == g.reduce_concat == CONCAT
        assert g.steps == 4


@pytest.mark.parametrize("name", sorted(gt.PUBLISHED))
def test_json_round_trip(name, tmp_path):
    g = gt.PUBLISHED[name]
    assert gt.Genotype.from_json(g.to_json()) == g
    assert gt.Genotype.from_json(g.to_json(indent=2)) == g
    assert gt.Genotype.from_dict(json.loads(g.to_json())) == g
    d = g.to_dict()
    assert sorted(d) == ["normal", "normal_concat", "reduce", "reduce_concat"]
    assert d["normal"][0] == list(g.normal[0])
    path = tmp_path / f"{name}.json"
    g.save(str(path))
    assert gt.Genotype.load(str(path)) == g
    assert hash(gt.Genotype.load(str(path))) == hash(g)
    assert os.listdir(tmp_path) == [f"{name}.json"]  # no temp file left
    assert json.loads(path.read_text()) == d


def test_lists_and_tuples_make_equal_genotypes():
    g = gt.PUBLISHED["DARTS_V2"]
    again = gt.Genotype(normal=[list(e) for e in g.normal],
                        normal_concat=list(g.normal_concat),
                        reduce=[list(e) for e in g.reduce],
                        reduce_concat=tuple(g.reduce_concat))
    assert again == g
    assert isinstance(again.normal[0], tuple)


# ---------------------------------------------------------------------------
# Validation: every error, with its message.


def data(**changes):
    d = gt.PUBLISHED["DARTS_V2"].to_dict()
    d.update(changes)
    return d


def edges(*pairs):
    return [list(p) for p in pairs]


EIGHT = [["sep_conv_3x3", 0]] * 8

# (case, genotype dict, a literal part of the message)
INVALID = [
    ("unknown op",
     data(normal=[["conv_9x9", 0]] + EIGHT[1:]),
     "Unknown op 'conv_9x9' at normal[0]; expected one of "
     + str(VALID_OPS)),
    ("none as an op",
     data(reduce=EIGHT[:3] + [["none", 1]] + EIGHT[4:]),
     "Unknown op 'none' at reduce[3]"),
    ("input out of range for its node",
     data(normal=EIGHT[:2] + [["sep_conv_3x3", 3]] + EIGHT[3:]),
     "Input 3 at normal[2] is out of range: node 1 can only read "
               "states 0..2"),
    ("negative input",
     data(normal=EIGHT[:7] + [["sep_conv_3x3", -1]]),
     "Input -1 at normal[7] is out of range: node 3"),
    ("odd number of edges",
     data(normal=EIGHT[:7], reduce=EIGHT[:7]),
     "Expected an even, non-zero number of normal edges (two per "
               "node). Received: 7 edges"),
    ("zero edges",
     data(normal=[], reduce=[]),
     "non-zero number of normal edges (two per node). Received: 0 edges"),
    ("mismatched edge counts",
     data(reduce=EIGHT[:6]),
     "Expected the same number of edges in both cells. Received: "
     "normal=8, reduce=6"),
    ("empty concat",
     data(normal_concat=[]),
     "Expected a non-empty normal_concat"),
    ("duplicate concat",
     data(reduce_concat=[2, 3, 3]),
     "Expected distinct states in reduce_concat. Received: "
               "[2, 3, 3]"),
    ("concat out of range",
     data(normal_concat=[2, 6]),
     "State 6 in normal_concat is out of range 0..5"),
    ("negative concat",
     data(reduce_concat=[-1]),
     "State -1 in reduce_concat is out of range 0..5"),
    ("edges not a list",
     data(normal="sep_conv_3x3"),
     "Expected `normal` to be a list of [op, input] pairs. "
     "Received: normal='sep_conv_3x3'"),
    ("edge input not an integer",
     data(normal=[["sep_conv_3x3", "0"]] + EIGHT[1:]),
     "Expected normal[0] to be an [op, input] pair with a string "
               "op and an integer input. Received: ['sep_conv_3x3', '0']"),
    ("edge input a bool",
     data(reduce=EIGHT[:1] + [["sep_conv_3x3", True]] + EIGHT[2:]),
     "Expected reduce[1] to be an [op, input] pair"),
    ("edge input a float",
     data(reduce=EIGHT[:1] + [["sep_conv_3x3", 1.0]] + EIGHT[2:]),
     "Expected reduce[1] to be an [op, input] pair"),
    ("edge of three items",
     data(normal=[["sep_conv_3x3", 0, 1]] + EIGHT[1:]),
     "Expected normal[0] to be an [op, input] pair"),
    ("edge op not a string",
     data(normal=[[4, 0]] + EIGHT[1:]),
     "Expected normal[0] to be an [op, input] pair"),
    ("concat not a list",
     data(normal_concat=5),
     "Expected `normal_concat` to be a list of state indices. "
     "Received: normal_concat=5"),
    ("concat of strings",
     data(reduce_concat=["2", "3"]),
     "Expected `reduce_concat` to be a list of state indices"),
    ("concat of bools",
     data(reduce_concat=[True]),
     "Expected `reduce_concat` to be a list of state indices"),
]


@pytest.mark.parametrize("case,value,message", INVALID,
                         ids=[c[0] for c in INVALID])
def test_validation_errors(case, value, message):
    with pytest.raises(gt.GenotypeError, match=re.escape(message)):
        gt.Genotype.from_dict(value)
    # The same error through JSON.
    with pytest.raises(gt.GenotypeError, match=re.escape(message)):
        gt.Genotype.from_json(json.dumps(value))


def test_field_errors():
    d = data()
    del d["reduce_concat"]
    with pytest.raises(gt.GenotypeError,
                       match=re.escape("missing field(s) ['reduce_concat']")):
        gt.Genotype.from_dict(d)
    with pytest.raises(gt.GenotypeError,
                       match=re.escape("unknown field(s) ['depth']")):
        gt.Genotype.from_dict(data(depth=3))
    with pytest.raises(gt.GenotypeError, match="Genotype is not valid JSON"):
        gt.Genotype.from_json("{'normal': ")
    with pytest.raises(gt.GenotypeError, match="Genotype is not valid JSON"):
        gt.Genotype.from_json("")
    with pytest.raises(gt.GenotypeError, match="Expected a JSON object for a "
                       "genotype. Received: list"):
        gt.Genotype.from_json("[1, 2]")
    with pytest.raises(gt.GenotypeError, match="Received: str"):
        gt.Genotype.from_json('"DARTS_V2"')


def test_genotype_error_is_a_value_error():
    # The CLI turns ValueErrors into one-line messages with exit code 2.
    assert issubclass(gt.GenotypeError, ValueError)


def test_load_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(gt.GenotypeError, match="Cannot read genotype file "
                       ".*nope.json.*No such file"):
        gt.Genotype.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data(normal_concat=[9])))
    with pytest.raises(gt.GenotypeError,
                       match=re.escape(f"{bad}: State 9 in normal_concat")):
        gt.Genotype.load(str(bad))
    with pytest.raises(gt.GenotypeError, match="Cannot read genotype file"):
        gt.Genotype.load(str(tmp_path))  # a directory


def test_frozen():
    g = gt.PUBLISHED["E2RNAS"]
    with pytest.raises(AttributeError):
        g.normal = ()


# ---------------------------------------------------------------------------
# get().


def test_get(tmp_path):
    assert gt.get("DARTS_V2") is gt.PUBLISHED["DARTS_V2"]
    g = gt.derive(HAND_NORMAL, HAND_NORMAL)
    path = tmp_path / "found.json"
    g.save(str(path))
    assert gt.get(str(path)) == g
    with pytest.raises(gt.GenotypeError, match=re.escape(
            "Genotype 'DARTS_V3' is neither a published name (DARTS_V1, "
            "DARTS_V2, E2RNAS) nor an existing JSON file")):
        gt.get("DARTS_V3")
    with pytest.raises(gt.GenotypeError, match="neither a published name"):
        gt.get(str(tmp_path / "missing.json"))
