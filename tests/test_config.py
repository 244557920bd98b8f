"""Budget files: discovery, precedence with sources, validation messages, init and check.

Most tests drive the real `tokencap config`, `tokencap budget check` and `tokencap init`
commands in a temporary directory tree; validation messages are also read straight from
`tokencap.config.read_file` on real files.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

from tests.conftest import TOKENCAP
from tokencap import config
from tokencap.errors import ConfigFileError
from tokencap.starter import STARTER
from tokencap.tomlkeys import key_lines

EXAMPLE = Path(__file__).parent.parent / "examples" / "tokencap.toml"


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """Return a home, a user config directory and a project with a nested working directory."""
    paths = {
        "home": tmp_path / "home",
        "xdg": tmp_path / "xdg",
        "project": tmp_path / "project",
        "cwd": tmp_path / "project" / "src" / "pkg",
    }
    for path in paths.values():
        path.mkdir(parents=True)
    return paths


@pytest.fixture
def env(tree: dict[str, Path], tokencap_env: dict[str, str]) -> dict[str, str]:
    return tokencap_env | {"HOME": str(tree["home"]), "XDG_CONFIG_HOME": str(tree["xdg"])}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TOKENCAP), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def shown(env: dict[str, str], cwd: Path, *flags: str) -> dict:
    """Return what `tokencap config --format json` prints."""
    result = cli(["config", "--format", "json", *flags], env, cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- Discovery -----------------------------------------------------------------------------


def test_nearest_tokencap_toml_upward(tree, env):
    write(tree["project"] / "tokencap.toml", "[run]\nmax_calls = 1\n")
    nearer = write(tree["project"] / "src" / "tokencap.toml", "[run]\nmax_calls = 2\n")

    data = shown(env, tree["cwd"])

    assert [f["path"] for f in data["files"]] == [str(nearer)]
    assert data["settings"]["max_calls"]["value"] == 2
    assert data["settings"]["max_calls"]["source"] == f"{nearer}:2"


def test_tokencap_toml_before_nearer_pyproject(tree, env):
    project_file = write(tree["project"] / "tokencap.toml", "[run]\nmax_calls = 1\n")
    write(tree["project"] / "src" / "pyproject.toml", "[tool.tokencap.run]\nmax_calls = 2\n")

    data = shown(env, tree["cwd"])

    assert data["files"][0]["path"] == str(project_file)
    assert data["settings"]["max_calls"]["value"] == 1


def test_pyproject_tool_table(tree, env):
    pyproject = write(
        tree["project"] / "pyproject.toml",
        """
        [project]
        name = "demo"

        [tool.tokencap.run]
        max_usd = 3
        """,
    )

    data = shown(env, tree["cwd"])

    assert data["files"][0] == {
        "path": str(pyproject),
        "layer": "project",
        "found_by": "search",
        "table": "tool.tokencap",
    }
    assert data["settings"]["max_usd"] == {
        "value": "3",
        "layer": "project",
        "source": f"{pyproject}:5",
    }


def test_pyproject_without_table_skipped(tree, env):
    outer = write(tree["project"] / "pyproject.toml", "[tool.tokencap.run]\nmax_calls = 4\n")
    write(tree["project"] / "src" / "pyproject.toml", "[project]\nname = 'inner'\n")
    # A broken pyproject.toml that never mentions tokencap is not ours to report.
    write(tree["cwd"] / "pyproject.toml", "[project\n")

    data = shown(env, tree["cwd"])

    assert data["files"][0]["path"] == str(outer)
    assert data["settings"]["max_calls"]["value"] == 4


def test_budget_env_before_search(tree, env):
    write(tree["project"] / "tokencap.toml", "[run]\nmax_calls = 1\n")
    named = write(tree["home"] / "ci-budget.toml", "[run]\nmax_calls = 9\n")

    data = shown(env | {"TOKENCAP_BUDGET": str(named)}, tree["cwd"])

    assert data["files"][0]["path"] == str(named)
    assert data["files"][0]["found_by"] == "TOKENCAP_BUDGET"
    assert data["settings"]["max_calls"]["value"] == 9


def test_budget_flag_before_env(tree, env):
    from_env = write(tree["home"] / "env.toml", "[run]\nmax_calls = 9\n")
    write(tree["cwd"] / "flag.toml", "[run]\nmax_calls = 5\n")

    data = shown(env | {"TOKENCAP_BUDGET": str(from_env)}, tree["cwd"], "--budget", "flag.toml")

    assert data["files"][0]["path"] == str(tree["cwd"] / "flag.toml")
    assert data["files"][0]["found_by"] == "--budget"
    assert data["settings"]["max_calls"]["value"] == 5


def test_budget_flag_missing_file(tree, env):
    result = cli(["config", "--budget", "nowhere.toml"], env, tree["cwd"])

    assert result.returncode == 2
    assert f"budget file not found: {tree['cwd'] / 'nowhere.toml'}" in result.stderr
    assert "--budget" in result.stderr


def test_budget_flag_pyproject_without_table(tree, env):
    write(tree["cwd"] / "pyproject.toml", "[project]\nname = 'x'  # tokencap\n")

    result = cli(["config", "--budget", "pyproject.toml"], env, tree["cwd"])

    assert result.returncode == 2
    assert "has no [tool.tokencap] table" in result.stderr


def test_user_file_in_xdg_config_home(tree, env):
    user_file = write(tree["xdg"] / "tokencap" / "config.toml", "[attribution]\nteam = 'infra'\n")

    data = shown(env, tree["cwd"])

    assert data["files"] == [
        {"path": str(user_file), "layer": "user", "found_by": "XDG_CONFIG_HOME", "table": None}
    ]
    assert data["settings"]["team"]["value"] == "infra"
    assert data["settings"]["team"]["layer"] == "user"


def test_user_file_default_under_home(tree, env):
    user_file = write(
        tree["home"] / ".config" / "tokencap" / "config.toml", "[attribution]\nteam = 'infra'\n"
    )
    without_xdg = {k: v for k, v in env.items() if k != "XDG_CONFIG_HOME"}

    data = shown(without_xdg, tree["cwd"])

    assert data["files"][0]["path"] == str(user_file)
    assert data["settings"]["team"]["source"] == f"{user_file}:2"


def test_no_files_gives_defaults(tree, env):
    data = shown(env, tree["cwd"])

    assert data["files"] == []
    assert data["settings"]["max_usd"] == {"value": None, "layer": "default", "source": "default"}
    assert data["settings"]["grace_seconds"]["value"] == "2"
    assert data["settings"]["unknown_model"]["value"] == "highest"


# --- Precedence ----------------------------------------------------------------------------

# Each layer sets max_usd, team and one tag; the test adds layers from the bottom up and checks
# that the newest one wins and is named as the source.
LAYERS = ["user", "project", "env", "flag"]


def _apply_layers(tree, env, count: int) -> tuple[dict[str, str], list[str]]:
    user_file = tree["xdg"] / "tokencap" / "config.toml"
    project_file = tree["project"] / "tokencap.toml"
    layers = LAYERS[:count]
    flags: list[str] = []
    if "user" in layers:
        write(user_file, "[run]\nmax_usd = 1\n[attribution]\nteam = 'from-user'\n")
    if "project" in layers:
        write(project_file, "[run]\nmax_usd = 2\n\n[attribution]\nteam = 'from-project'\n")
    if "env" in layers:
        env = env | {"TOKENCAP_MAX_USD": "3", "TOKENCAP_TEAM": "from-env"}
    if "flag" in layers:
        flags = ["--max-usd", "4", "--team", "from-flag"]
    return env, flags


@pytest.mark.parametrize("count", [1, 2, 3, 4], ids=LAYERS)
def test_each_layer_wins_over_lower(tree, env, count):
    env, flags = _apply_layers(tree, env, count)
    expected_source = {
        "user": f"{tree['xdg'] / 'tokencap' / 'config.toml'}:2",
        "project": f"{tree['project'] / 'tokencap.toml'}:2",
        "env": "TOKENCAP_MAX_USD",
        "flag": "--max-usd",
    }
    top = LAYERS[count - 1]

    data = shown(env, tree["cwd"], *flags)

    max_usd = data["settings"]["max_usd"]
    team = data["settings"]["team"]
    assert max_usd["value"] == str(count)
    assert max_usd["layer"] == top
    assert max_usd["source"] == expected_source[top]
    assert team["value"] == f"from-{top}"
    assert team["layer"] == top


def test_project_team_line_is_its_own(tree, env):
    env, flags = _apply_layers(tree, env, 2)

    data = shown(env, tree["cwd"], *flags)

    assert data["settings"]["team"]["source"] == f"{tree['project'] / 'tokencap.toml'}:5"


def test_task_table_overrides_defaults(tree, env):
    project_file = write(
        tree["project"] / "tokencap.toml",
        """
        [run]
        max_usd = 5
        max_calls = 100

        [attribution]
        team = "platform"
        tags = { repo = "web", stage = "dev" }

        [tasks.fix-login]
        max_usd = 2
        agent = "claude"
        tags = { stage = "review" }
        """,
    )

    data = shown(env, tree["cwd"], "--task", "fix-login")

    settings = data["settings"]
    assert settings["task"] == {"value": "fix-login", "layer": "flag", "source": "--task"}
    assert settings["max_usd"]["value"] == "2"
    assert settings["max_usd"]["source"] == f"{project_file}:10"
    assert settings["max_calls"]["value"] == 100
    assert settings["agent"]["value"] == "claude"
    assert settings["team"]["value"] == "platform"
    assert settings["tags.repo"]["value"] == "web"
    assert settings["tags.stage"]["value"] == "review"
    assert settings["tags.stage"]["source"] == f"{project_file}:12"


def test_task_from_environment_selects_table(tree, env):
    write(tree["project"] / "tokencap.toml", "[tasks.nightly]\nmax_calls = 7\n")

    data = shown(env | {"TOKENCAP_TASK": "nightly"}, tree["cwd"])

    assert data["settings"]["task"]["source"] == "TOKENCAP_TASK"
    assert data["settings"]["max_calls"]["value"] == 7


def test_user_task_table_beats_project_default(tree, env):
    # Files merge first, then the task's table applies: a task setting from the user file
    # wins over the project's default for every task.
    user_file = write(tree["xdg"] / "tokencap" / "config.toml", "[tasks.t1]\nmax_calls = 3\n")
    write(tree["project"] / "tokencap.toml", "[run]\nmax_calls = 50\n")

    data = shown(env, tree["cwd"], "--task", "t1")

    assert data["settings"]["max_calls"]["value"] == 3
    assert data["settings"]["max_calls"]["source"] == f"{user_file}:2"


def test_environment_beats_task_table(tree, env):
    write(tree["project"] / "tokencap.toml", "[tasks.t1]\nmax_calls = 3\n")

    data = shown(env | {"TOKENCAP_MAX_CALLS": "12"}, tree["cwd"], "--task", "t1")

    assert data["settings"]["max_calls"]["value"] == 12
    assert data["settings"]["max_calls"]["source"] == "TOKENCAP_MAX_CALLS"


def test_tags_merge_key_by_key(tree, env):
    write(
        tree["project"] / "tokencap.toml", "[attribution]\ntags = { a = '1', b = '2', c = '3' }\n"
    )

    data = shown(env | {"TOKENCAP_TAGS": "b=env,d=env"}, tree["cwd"], "--tag", "c=flag")

    settings = data["settings"]
    assert settings["tags.a"]["value"] == "1"
    assert settings["tags.b"] == {"value": "env", "layer": "env", "source": "TOKENCAP_TAGS"}
    assert settings["tags.c"] == {"value": "flag", "layer": "flag", "source": "--tag"}
    assert settings["tags.d"]["value"] == "env"


def test_price_entry_replaced_whole(tree, env):
    write(
        tree["xdg"] / "tokencap" / "config.toml",
        "[prices.models.m1]\ninput_per_mtok = 1\noutput_per_mtok = 2\ncache_read_per_mtok = 0.1\n",
    )
    project_file = write(
        tree["project"] / "tokencap.toml",
        "[prices.models.m1]\ninput_per_mtok = 4\noutput_per_mtok = 8\n",
    )

    (price,) = shown(env, tree["cwd"])["prices"]

    assert price["input_per_mtok"] == "4"
    assert price["output_per_mtok"] == "8"
    # The user file's cache rate does not leak into the project's price.
    assert price["cache_read_per_mtok"] == "4"
    assert price["source"] == f"{project_file}:1"


def test_budgets_merge_key_by_key(tree, env):
    user_file = write(
        tree["xdg"] / "tokencap" / "config.toml",
        "[teams.platform]\nmax_usd_per_day = 100\nmax_usd_per_week = 300\n",
    )
    project_file = write(
        tree["project"] / "tokencap.toml", "[teams.platform]\nmax_usd_per_day = 40\n"
    )

    budgets = {b["budget"]: b for b in shown(env, tree["cwd"])["budgets"]}

    assert budgets["team_budget:platform/day"]["max_usd"] == "40"
    assert budgets["team_budget:platform/day"]["source"] == f"{project_file}:2"
    assert budgets["team_budget:platform/week"]["max_usd"] == "300"
    assert budgets["team_budget:platform/week"]["source"] == f"{user_file}:3"


def test_config_lists_merged_keys(tree, env):
    user_file = write(
        tree["xdg"] / "tokencap" / "config.toml",
        "[run]\nmax_usd = 1\n[tasks.other]\nmax_calls = 3\n",
    )
    project_file = write(tree["project"] / "tokencap.toml", "[run]\nmax_usd = 2\n")

    keys = shown(env, tree["cwd"])["keys"]

    assert keys == {
        "run.max_usd": {"value": "2", "source": f"{project_file}:2"},
        "tasks.other.max_calls": {"value": 3, "source": f"{user_file}:4"},
    }


def test_invalid_environment_value(tree, env):
    result = cli(["config"], env | {"TOKENCAP_MAX_USD": "lots"}, tree["cwd"])

    assert result.returncode == 2
    assert "invalid TOKENCAP_MAX_USD 'lots'" in result.stderr


def test_config_table_names_sources(tree, env):
    project_file = write(tree["project"] / "tokencap.toml", "[run]\nmax_calls = 8\n")

    result = cli(["config"], env, tree["cwd"])

    assert result.returncode == 0, result.stderr
    assert "max_calls" in result.stdout
    assert f"{project_file}:2" in result.stdout


# --- Validation ----------------------------------------------------------------------------

# Each case: file text, then the line, the key and a phrase the message must contain.
INVALID = {
    "unknown-top-level": (
        "[run]\nmax_usd = 5\n\n[mystery]\n",
        4,
        "mystery",
        'unknown key "mystery"',
    ),
    "unknown-in-table": (
        "[run]\nmax_usd = 5\nmax_dollars = 3\n",
        3,
        "run.max_dollars",
        "unknown key",
    ),
    "unknown-suggests": ("[run]\ngrace = 3\n", 2, "run.grace", 'did you mean "grace_seconds"?'),
    "unknown-dotted": ("title = 1\n", 1, "title", 'unknown key "title"'),
    "unknown-dotted-nested": (
        "run.max_usd = 5\nrun.max_call = 3\n",
        2,
        "run.max_call",
        'did you mean "max_calls"?',
    ),
    "unknown-inline-table": (
        "attribution = { team = 'a', teem = 'b' }\n",
        1,
        "attribution.teem",
        'did you mean "team"?',
    ),
    "unknown-inline-second-line": (
        "[run]\nmax_usd = 1\n[attribution]\ntags = { a = 'x' }\nwho = { name = 'x' }\n",
        5,
        "attribution.who",
        "unknown key",
    ),
    "unknown-quoted-key": ('[run]\n"max usd" = 5\n', 2, 'run."max usd"', 'unknown key "max usd"'),
    "unknown-in-quoted-task": (
        '[tasks."fix login"]\nmax_usd = 1\nmax_usd_totl = 3\n',
        3,
        'tasks."fix login".max_usd_totl',
        'did you mean "max_usd_total"?',
    ),
    "unknown-in-price": (
        "[prices.models.'llama3.1:8b']\ninput_per_mtok = 0\noutput_per_mtok = 0\ncached = 0\n",
        4,
        'prices.models."llama3.1:8b".cached',
        "unknown key",
    ),
    "string-for-number": ('[run]\nmax_calls = "5"\n', 2, "run.max_calls", 'got string "5"'),
    "float-for-calls": ("[run]\nmax_calls = 2.5\n", 2, "run.max_calls", "got float 2.5"),
    "number-for-name": ("[attribution]\nteam = 5\n", 2, "attribution.team", "got integer 5"),
    "boolean-for-usd": ("[run]\nmax_usd = true\n", 2, "run.max_usd", "got boolean true"),
    "number-tag": ("[attribution]\ntags = { pr = 12 }\n", 2, "attribution.tags.pr", "quote it"),
    "value-for-table": ("run = 5\n", 1, "run", "expected a table, got integer 5"),
    "array-of-tables": ("[[tasks]]\nmax_usd = 1\n", 1, "tasks", "got an array"),
    "negative-cap": ("[run]\nmax_usd = -1\n", 2, "run.max_usd", "must be more than 0, got -1"),
    "zero-cap": ("[run]\nmax_usd = 0.0\n", 2, "run.max_usd", "must be more than 0, got 0.0"),
    "zero-calls": ("[run]\nmax_calls = 0\n", 2, "run.max_calls", "at least 1, got 0"),
    "zero-team-budget": (
        "[teams.platform]\nmax_usd_per_day = 0\n",
        2,
        "teams.platform.max_usd_per_day",
        "must be more than 0",
    ),
    "negative-task-total": (
        "[tasks.t]\nmax_usd_total = -2.5\n",
        2,
        "tasks.t.max_usd_total",
        "got -2.5",
    ),
    "negative-grace": (
        "[run]\ngrace_seconds = -1\n",
        2,
        "run.grace_seconds",
        "expected seconds from 0 to 300, got -1",
    ),
    "long-grace": ("[run]\ngrace_seconds = 301\n", 2, "run.grace_seconds", "got 301"),
    "too-precise-cap": (
        "[tasks.t]\nmax_usd_total = 0.0000000000001\n",
        2,
        "tasks.t.max_usd_total",
        "12 decimal places",
    ),
    "negative-price": (
        "[prices.models.m]\ninput_per_mtok = -1\noutput_per_mtok = 1\n",
        2,
        "prices.models.m.input_per_mtok",
        "cannot be negative",
    ),
    "price-missing-output": (
        "[prices]\nunknown_model = 'highest'\n\n[prices.models.m]\ninput_per_mtok = 1\n",
        4,
        "prices.models.m",
        "missing output_per_mtok",
    ),
    "price-unknown-provider": (
        "[prices.models.m]\ninput_per_mtok = 1\noutput_per_mtok = 1\nprovider = 'acme'\n",
        4,
        "prices.models.m.provider",
        'got string "acme"',
    ),
    "unknown-model-policy": (
        "[prices]\nunknown_model = 'strict'\n",
        2,
        "prices.unknown_model",
        'expected "highest" or "refuse"',
    ),
    "extra-host-url": (
        "[proxy]\nextra_hosts = [\n  'llm.internal',\n  'https://x.example/v1',\n]\n",
        4,
        "proxy.extra_hosts[1]",
        "give the host name only",
    ),
    "wildcard-task": ("[tasks.'*']\nmax_usd = 1\n", 1, 'tasks."*"', '"*" cannot name a task'),
    "empty-team-name": ("[teams.'']\nmax_usd_per_day = 1\n", 1, 'teams.""', "name is empty"),
    "multiline-string-before": (
        "[attribution]\ntags = { note = '''x''' }\nteam = '''a\nb'''\nagent = 3\n",
        5,
        "attribution.agent",
        "got integer 3",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_file_message(case, tmp_path):
    text, line, key, phrase = INVALID[case]
    path = write(tmp_path / "tokencap.toml", text)

    _, problems = config.read_file(config.ConfigFile(path, "project", "--budget"))

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:{line}: {key}: ")
    assert phrase in problems[0]


def test_pyproject_problem_names_full_key(tmp_path):
    path = write(
        tmp_path / "pyproject.toml",
        """
        [project]
        name = "x"

        [tool.tokencap.run]
        max_usd = 0
        """,
    )

    _, problems = config.read_file(
        config.ConfigFile(path, "project", "search", ("tool", "tokencap"))
    )

    assert problems == [
        f"{path}:5: tool.tokencap.run.max_usd: a dollar cap must be more than 0, got 0; "
        "set it such as 5 or 0.50, or remove the key for no cap"
    ]


def test_every_problem_reported(tmp_path):
    path = write(tmp_path / "tokencap.toml", "[run]\nmax_usd = -1\nmax_calls = 0\n[oops]\n")

    with pytest.raises(ConfigFileError) as raised:
        config.load([config.ConfigFile(path, "project", "--budget")])

    assert [p.split(": ")[0] for p in raised.value.problems] == [
        f"{path}:2",
        f"{path}:3",
        f"{path}:4",
    ]


SYNTAX = {
    "missing-value": ("[run]\nmax_usd = 5\nmax_calls = \n", ":3:13: invalid TOML: Invalid value"),
    "declared-twice": (
        "[run]\nmax_usd = 1\n[run]\n",
        ":3:5: invalid TOML: Cannot declare run twice",
    ),
    "unterminated-string": (
        '[run]\nmax_usd = 1\n[attribution]\nteam = "platform\n',
        ":4:17: invalid TOML: Illegal character",
    ),
    "end-of-document": (
        "[run]\nmax_usd = 1\nlist = [1,\n2",
        ":4: invalid TOML: Unclosed array at the end of the file",
    ),
}


@pytest.mark.parametrize("case", sorted(SYNTAX))
def test_unparseable_file_message(case, tmp_path):
    text, expected = SYNTAX[case]
    path = write(tmp_path / "tokencap.toml", text)

    with pytest.raises(ConfigFileError) as raised:
        config.read_file(config.ConfigFile(path, "project", "--budget"))

    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}{expected}")


def test_not_utf8_file(tmp_path):
    path = tmp_path / "tokencap.toml"
    path.write_bytes(b"[attribution]\nteam = '\xff'\n")

    with pytest.raises(ConfigFileError) as raised:
        config.read_file(config.ConfigFile(path, "project", "--budget"))

    assert raised.value.problems == [f"{path}: not UTF-8 text (byte 22); save it as UTF-8"]


def test_decimal_values_exact(tmp_path):
    path = write(
        tmp_path / "tokencap.toml",
        "[run]\nmax_usd = 0.1\n[prices.models.m]\ninput_per_mtok = 0.075\noutput_per_mtok = 3e-1\n",
    )

    settings, problems = config.read_file(config.ConfigFile(path, "project", "--budget"))

    assert problems == []
    assert settings[("run", "max_usd")].value == Decimal("0.1")
    price = settings[("prices", "models", "m")].value
    assert price.input_per_mtok == Decimal("0.075")
    assert price.output_per_mtok == Decimal("0.3")


# --- Commands ------------------------------------------------------------------------------


def test_budget_check_reports_and_exits_2(tree, env):
    path = write(tree["cwd"] / "budget.toml", "[run]\nmax_usd = 0\n\n[tasks.t]\nmax_call = 5\n")

    result = cli(["budget", "check", "budget.toml"], env, tree["cwd"])

    assert result.returncode == 2
    assert f"{path}:2: run.max_usd: a dollar cap must be more than 0" in result.stderr
    assert f'{path}:5: tasks.t.max_call: unknown key "max_call"' in result.stderr
    assert result.stdout == ""


def test_budget_check_valid_file(tree, env):
    path = write(tree["cwd"] / "budget.toml", "[run]\nmax_usd = 1\n")

    result = cli(["budget", "check", "budget.toml"], env, tree["cwd"])

    assert result.returncode == 0, result.stderr
    assert f"{path} is valid" in result.stderr


def test_budget_check_discovered_files(tree, env):
    project_file = write(tree["project"] / "tokencap.toml", "[run]\nmax_usd = 1\n")
    user_file = write(tree["xdg"] / "tokencap" / "config.toml", "[users.bob]\nmax_usd_total = 0\n")

    result = cli(["budget", "check"], env, tree["cwd"])

    assert result.returncode == 2
    assert f"{user_file}:2: users.bob.max_usd_total" in result.stderr
    assert str(project_file) not in result.stderr


def test_budget_check_without_files(tree, env):
    result = cli(["budget", "check"], env, tree["cwd"])

    assert result.returncode == 0
    assert "no budget file found" in result.stderr


def test_init_writes_valid_starter(tree, env):
    result = cli(["init"], env, tree["cwd"])

    assert result.returncode == 0, result.stderr
    path = tree["cwd"] / "tokencap.toml"
    assert path.read_text() == STARTER
    check = cli(["budget", "check"], env, tree["cwd"])
    assert check.returncode == 0, check.stderr
    assert f"{path} is valid" in check.stderr


def test_init_keeps_existing_file(tree, env):
    path = write(tree["cwd"] / "tokencap.toml", "[run]\nmax_usd = 1\n")

    refused = cli(["init"], env, tree["cwd"])
    forced = cli(["init", "--force"], env, tree["cwd"])

    assert refused.returncode == 2
    assert f"{path} already exists" in refused.stderr
    assert forced.returncode == 0, forced.stderr
    assert path.read_text() == STARTER


def test_starter_settings(tmp_path):
    path = write(tmp_path / "tokencap.toml", STARTER)

    settings, problems = config.read_file(config.ConfigFile(path, "project", "search"))

    assert problems == []
    assert settings[("run", "max_usd")].value == Decimal(5)
    assert settings[("run", "max_calls")].value == 200


def test_example_file_is_valid():
    cfg = config.load([config.ConfigFile(EXAMPLE, "project", "--budget")])

    settings = config.resolve(cfg, config.Flags(task="fix-login"), {})
    assert settings.max_usd.value == Decimal(2)
    assert {rule.cap for rule in settings.budgets} >= {
        "task_budget:fix-login/total",
        "team_budget:platform/day",
        "user_budget:*/day",
    }
    assert any(price.model == "llama3.1:8b" for price in settings.prices)


# --- Key locator ---------------------------------------------------------------------------


def test_key_lines_cover_toml_forms():
    text = textwrap.dedent(
        """\
        title = "not # a comment"  # a comment
        [run]
        "quoted key" = 1
        'literal.key' = 2
        a.b . "c\\u0041" = 3
        s = \"\"\"first
        [not.a.table]
        \"\"\"
        arr = [
          1, # comment
          { x = 1, y.z = [2, 3] },
        ]
        [tasks."fix login"]
        tags = { repo = "web" }
        [[items]]
        n = 1
        [[items]]
        n = 2
        [items.sub]
        k = 1
        """
    )
    tomllib.loads(text)

    lines = key_lines(text)

    assert lines[("title",)] == 1
    assert lines[("run", "quoted key")] == 3
    assert lines[("run", "literal.key")] == 4
    assert lines[("run", "a", "b", "cA")] == 5
    assert ("not", "a", "table") not in lines
    assert lines[("run", "arr", 1, "y", "z")] == 11
    assert lines[("tasks", "fix login", "tags", "repo")] == 14
    assert lines[("items", 1, "n")] == 18
    assert lines[("items", 1, "sub", "k")] == 20
