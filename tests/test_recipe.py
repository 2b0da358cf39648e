"""Recipe loading: valid sections load, every bad recipe is one RecipeError naming file, key and allowed values."""

import os
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callbacks import IntegrityConfig, Monitor, RecipeError, load_recipe
from callbacks.checks import REGISTRY


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_full_section_from_design_loads(tmp_path):
    path = write(tmp_path, """
        model: {anything: goes}        # other top-level keys belong to the training recipe
        integrity:
          policy: warn
          report: out/integrity.json
          checks:
            ties:        {declare: [["tok_embeddings.weight", "output.weight"]], every_n_steps: 50}
            adapter_init: {probe: true, tolerance: 1.0e-6}
            saved_state: {verify_values: false}
            hashes:      {every_n_steps: 1, replicas: true, frozen: true, ledger: out/hashes.jsonl, backend: auto}
            merge:       {tolerance: 1.0e-3}
        """)
    config = load_recipe(path)
    assert config.policy == "warn"
    assert config.checks.ties.declare == [["tok_embeddings.weight", "output.weight"]]
    assert config.checks.ties.every_n_steps == 50
    assert config.checks.hashes.ledger == "out/hashes.jsonl"


def test_missing_section_means_defaults(tmp_path):
    config = load_recipe(write(tmp_path, "seed: 0\n"))
    assert config == IntegrityConfig()
    assert config.policy == "raise"


def test_enabled_false_turns_a_check_off(tmp_path):
    path = write(tmp_path, "integrity: {checks: {hashes: {enabled: false}}}\n")
    names = [c.name for c in Monitor.from_recipe(path).checks]
    assert "hashes" not in names and "ties" in names


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("integrity: {polcy: raise}", "integrity.polcy", "allowed keys: checks, policy, report"),
        ("integrity: {policy: explode}", "integrity.policy", "'raise', 'warn' or 'log'"),
        ("integrity: {checks: {tie: {}}}", "integrity.checks.tie", "allowed keys: adapter_init, hashes, merge"),
        ("integrity: {checks: {ties: {every_n_steps: 0}}}", "integrity.checks.ties.every_n_steps", "greater than"),
        ("integrity: {checks: {ties: {every_n_steps: often}}}", "integrity.checks.ties.every_n_steps", "integer"),
        ("integrity: {checks: {hashes: {backend: cuda}}}", "integrity.checks.hashes.backend", "'auto', 'torch'"),
        ("integrity: {checks: {ties: {declare: [[a.weight]]}}}", "integrity.checks.ties.declare", "two different"),
        ("integrity: [1, 2]", "integrity", "expected a mapping"),
        ("integrity: {checks: {ties: 3}}", "integrity.checks.ties", "mapping"),
        ("integrity: {checks: {trainable: {not_updated_after_steps: 0}}}",
         "integrity.checks.trainable.not_updated_after_steps", "greater than"),
        ("integrity: {checks: {trainable: {expect_change: [a]}}}", "integrity.checks.trainable.expect_change",
         "allowed keys: enabled, expect_changes, ignore, not_updated_after_steps, skipped_steps_tolerated"),
    ],
)
def test_bad_recipe_names_file_key_and_what_is_allowed(tmp_path, text, key, allowed):
    path = write(tmp_path, text + "\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(path)
    assert info.value.key == key
    assert allowed in message
    assert isinstance(info.value, ValueError)


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    path = write(tmp_path, "integrity: {policy: raise\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line \d+") as info:
        load_recipe(path)
    assert path in str(info.value)
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_constructor_arguments_validated_like_the_recipe():
    with pytest.raises(ValueError, match="checks.hashes.every_n_step"):
        Monitor(checks={"hashes": {"every_n_step": 1}})
    with pytest.raises(ValueError, match="declare_ties"):
        Monitor(declare_ties=[("only_one.weight",)])
    with pytest.raises(ValueError, match="declare_ties"):
        Monitor(declare_ties="a.weight,b.weight")


# -- property: arbitrary YAML gives a valid config or a RecipeError, nothing else --------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.floats(allow_nan=False, width=32),
                    st.sampled_from(["raise", "warn", "log", "auto", "torch", "triton", "x", ""]))
keys = st.sampled_from(["policy", "report", "checks", "enabled", "every_n_steps", "declare", "backend", "ledger",
                        "probe", "tolerance", "verify_values", "watch", "replicas", "frozen", *REGISTRY, "bogus"])
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=documents)
def test_arbitrary_yaml_gives_config_or_recipe_error(tmp_path, section):
    path = os.path.join(tmp_path, "fuzz.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump({"integrity": section}, fh)
    try:
        config = load_recipe(path)
    except RecipeError as err:
        assert str(err).startswith(path)
        assert err.key.startswith("integrity")
    else:
        assert isinstance(config, IntegrityConfig)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_arbitrary_text_gives_config_or_recipe_error(tmp_path, text):
    path = os.path.join(tmp_path, "text.yaml")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
        fh.write(text)
    try:
        load_recipe(path)
    except RecipeError as err:
        assert path in str(err)
