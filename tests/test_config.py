"""Configuration through traitlets (issue 13 item 9): ``Cluster``, ``MultiEngineClient`` and
``ParallelMagics`` are ``Configurable``; ``%config`` and ``ipython_config.py`` set them,
keyword arguments still win, bad values name the option, ``%pxconfig`` overrides per session."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from IPython.utils.capture import capture_output
from traitlets.config import Config

from ipy_multiengine.client import MultiEngineClient
from ipy_multiengine.cluster import Cluster
from ipy_multiengine.errors import ConfigError, MultiEngineError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ip(ip):
    """conftest's shell, and the traits and config sections a test sets put back as found."""
    shell = ip
    magics = shell.magics_manager.registry["ParallelMagics"]
    defaults = {
        name: magics.trait_defaults(name)
        for name in ("stream", "collapse", "timeout", "group_outputs")
    }
    # %config also merges its lines into the shell's config (what a reloaded extension or a new
    # Cluster reads): keep the sections as found
    sections = ("ParallelMagics", "Cluster", "MultiEngineClient")
    saved = {name: copy.deepcopy(shell.config[name]) for name in sections if name in shell.config}
    magics.reset()
    yield shell
    for name in sections:
        shell.config.pop(name, None)
        if name in saved:
            shell.config[name] = saved[name]
    magics = shell.magics_manager.registry[
        "ParallelMagics"
    ]  # a test may have reloaded the extension
    for name, value in defaults.items():  # the traits are the shell's: leave them as found
        setattr(magics, name, value)
    magics.reset()


def _magics(shell):
    return shell.magics_manager.registry["ParallelMagics"]


# ---------------------------------------------------------------------- the magics
def test_config_percent_config_sets_parallel_magics_stream(ip):
    magics = _magics(ip)
    assert magics.stream is True and magics.pxconfig_.stream is True
    ip.run_line_magic("config", "ParallelMagics.stream = False")
    assert magics.stream is False and magics.pxconfig_.stream is False
    with capture_output() as cap:  # a %%px cell now collects (and still shows) every output
        ip.run_cell_magic("px", "", "print('configured', 7)")
    assert cap.stdout.count("configured 7") == 4


def test_config_pxconfig_overrides_the_traits_for_the_session_and_reset_returns(ip):
    magics = _magics(ip)
    ip.run_line_magic("pxconfig", "--collapse --timeout 5")
    ip.run_line_magic("config", "ParallelMagics.collapse = False")
    ip.run_line_magic("config", "ParallelMagics.timeout = 30.0")
    ip.run_line_magic("config", "ParallelMagics.stream = False")
    cfg = magics.pxconfig_
    assert (cfg.collapse, cfg.timeout) == (True, 5.0)  # %pxconfig's values win for the session
    assert cfg.stream is False  # not set by %pxconfig: follows the trait
    ip.run_line_magic("pxconfig", "--reset")
    cfg = magics.pxconfig_
    assert (cfg.collapse, cfg.timeout, cfg.stream) == (False, 30.0, False)  # the configured traits
    with capture_output() as cap:
        ip.run_line_magic("pxconfig", "")
    assert "timeout: 30.0" in cap.stdout and "stream: False" in cap.stdout


def test_config_bad_percent_config_value_names_the_option(ip, caplog):
    magics = _magics(ip)
    with caplog.at_level(logging.ERROR):
        ip.run_line_magic("config", "ParallelMagics.group_outputs = 'bogus'")
        ip.run_line_magic("config", "ParallelMagics.timeout = -1")
    assert "'group_outputs' trait" in caplog.text and "'timeout' trait" in caplog.text
    assert magics.group_outputs == "engine" and magics.timeout is None


def test_config_magics_traits_have_help():
    from ipy_multiengine.magics import PX_DEFAULTS, ParallelMagics

    traits = ParallelMagics.class_traits(config=True)
    assert set(PX_DEFAULTS) <= set(traits)
    assert all(traits[name].help for name in PX_DEFAULTS)


# ---------------------------------------------------------------------- Cluster
def test_config_cluster_takes_a_config_and_keywords_win():
    cfg = Config()
    cfg.Cluster.n = 2
    cfg.Cluster.shutdown_wait = 1.5
    cfg.Cluster.kernel_name = "python3"
    c = Cluster(config=cfg)  # not started: nothing to clean up
    assert (c.n, c.shutdown_wait, c.launcher.n) == (2, 1.5, 2)
    c = Cluster(3, config=cfg)
    assert (c.n, c.launcher.n, c.shutdown_wait) == (3, 3, 1.5)
    c = Cluster(n=1, shutdown_wait=0.5, config=cfg)
    assert (c.n, c.shutdown_wait) == (1, 0.5)


def test_config_cluster_bad_configured_value_names_the_option():
    for option, value in [
        ("n", 0),
        ("n", "eight"),
        ("transport_encryption", "maybe"),
        ("startup_timeout", "soon"),
    ]:
        cfg = Config()
        cfg.Cluster[option] = value
        with pytest.raises(ConfigError, match=f"Cluster.{option}") as info:
            Cluster(config=cfg)
        assert info.value.option == f"Cluster.{option}"
        assert isinstance(info.value, ValueError) and isinstance(info.value, MultiEngineError)


def test_config_cluster_keyword_errors_are_unchanged():
    with pytest.raises(ValueError, match="n must be a positive int"):
        Cluster(n=0)
    with pytest.raises(ValueError, match="transport_encryption must be"):
        Cluster(transport_encryption="maybe")


def test_config_cluster_traits_have_help():
    traits = Cluster.class_traits(config=True)
    expected = {
        "n",
        "kernel_name",
        "profile",
        "startup_timeout",
        "env",
        "write_file",
        "engines",
        "auto_restart",
        "transport_encryption",
        "shutdown_wait",
        "launcher",
        "launcher_options",
    }
    assert expected <= set(traits)
    assert all(traits[name].help for name in expected)


# ---------------------------------------------------------------------- MultiEngineClient
def test_config_client_takes_a_config_and_keywords_win(cluster):
    cfg = Config()
    cfg.MultiEngineClient.targets = [0, 1]
    cfg.MultiEngineClient.block = False
    cfg.MultiEngineClient.progress_after = 5.0
    cfg.MultiEngineClient.timeout = 20.0
    client = MultiEngineClient(cluster.cluster_file, config=cfg, timeout=30.0)
    try:
        assert (client.targets, client.block, client.progress_after, client.timeout) == (
            [0, 1],
            False,
            5.0,
            30.0,
        )
        assert client.execute("1 + 1").get_result(timeout=30) is not None
        assert len(client.execute("1").get_result(timeout=30)) == 2  # the configured targets
    finally:
        client.close()


def test_config_client_bad_configured_value_names_the_option(cluster):
    for option, value in [
        ("targets", [99]),
        ("targets", [0, "1"]),
        ("heartbeat", "often"),
        ("block", "yes"),
    ]:
        cfg = Config()
        cfg.MultiEngineClient[option] = value
        with pytest.raises(ConfigError, match=f"MultiEngineClient.{option}") as info:
            MultiEngineClient(cluster.cluster_file, config=cfg)
        assert info.value.option == f"MultiEngineClient.{option}"


def test_config_client_traits_have_help():
    traits = MultiEngineClient.class_traits(config=True)
    expected = {
        "block",
        "targets",
        "progress_after",
        "return_before_send",
        "timeout",
        "heartbeat",
        "max_message_size",
    }
    assert expected <= set(traits)
    assert all(traits[name].help for name in expected)


# ---------------------------------------------------------------------- ipython_config.py
def _profile(tmp_path, text: str) -> tuple[dict, str]:
    ipdir = tmp_path / "ipython"
    profile = ipdir / "profile_cfg"
    profile.mkdir(parents=True)
    (profile / "ipython_config.py").write_text(textwrap.dedent(text))
    env = {**os.environ, "IPYTHONDIR": str(ipdir)}
    return env, str(profile)


def test_config_ipython_config_py_sets_cluster_n_for_real(tmp_path):
    env, profile = _profile(
        tmp_path,
        """
        c = get_config()  # noqa: F821
        c.Cluster.n = 1
        c.Cluster.startup_timeout = 90.0
        c.ParallelMagics.stream = False
        c.MultiEngineClient.progress_after = 7.0
    """,
    )
    code = textwrap.dedent("""
        from ipy_multiengine.cluster import Cluster
        ip = get_ipython()
        ip.run_line_magic("load_ext", "ipy_multiengine")
        print("STREAM", ip.magics_manager.registry["ParallelMagics"].stream)
        with Cluster() as mec:
            print("ENGINES", len(mec.get_ids()), len(mec.execute("import os; os.getpid()")))
            print("PROGRESS", mec.progress_after)
        print("N2", Cluster(n=2).n)
    """)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            f"--profile-dir={profile}",
            "--HistoryManager.enabled=False",
            "--colors=NoColor",
            "--no-banner",
            "-c",
            code,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "STREAM False" in out, out + proc.stderr
    assert "ENGINES 1 1" in out, out + proc.stderr  # c.Cluster.n = 1: one engine really started
    assert "PROGRESS 7.0" in out and "N2 2" in out, out + proc.stderr


def test_config_outside_ipython_no_config_applies(tmp_path):
    # outside IPython there is no shell: ipython_config.py does not apply; config= does
    env, _profile_dir = _profile(
        tmp_path,
        """
        c = get_config()  # noqa: F821
        c.Cluster.n = 1
    """,
    )
    code = textwrap.dedent("""
        from traitlets.config import Config
        from ipy_multiengine.cluster import Cluster
        cfg = Config(); cfg.Cluster.n = 3
        print("N", Cluster().n, Cluster().launcher.n, Cluster(config=cfg).n)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "N 4 4 3" in proc.stdout, proc.stdout  # ipython_config.py said n=1: not applied


def test_config_every_trait_is_documented():
    from pathlib import Path

    from ipy_multiengine.magics import PX_DEFAULTS, ParallelMagics

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    for cls, names in [
        (Cluster, Cluster.class_trait_names(config=True)),
        (MultiEngineClient, MultiEngineClient.class_trait_names(config=True)),
        (ParallelMagics, PX_DEFAULTS),
    ]:
        for name in names:
            assert f"| `{cls.__name__}.{name}` |" in page, (
                f"docs/configuration.md does not list {cls.__name__}.{name}"
            )


def test_config_reloaded_extension_is_the_one_percent_config_sets(ip):
    from ipy_multiengine.magics import ParallelMagics

    ip.run_line_magic("unload_ext", "ipy_multiengine")
    ip.run_line_magic("load_ext", "ipy_multiengine")
    assert len([c for c in ip.configurables if isinstance(c, ParallelMagics)]) == 1
    ip.run_line_magic("config", "ParallelMagics.collapse = True")
    assert _magics(ip).collapse is True and _magics(ip).pxconfig_.collapse is True
    assert ip.run_line_magic("config", "ParallelMagics.collapse") is True


def test_config_percent_config_reaches_clusters_created_later(ip):
    # %config merges into the shell's config, which a Cluster created in IPython reads
    ip.run_line_magic("config", "Cluster.n = 2")
    ip.run_line_magic("config", "Cluster.shutdown_wait = 0.5")
    c = Cluster()  # not started
    assert (c.n, c.launcher.n, c.shutdown_wait) == (2, 2, 0.5)
    assert Cluster(n=1).n == 1
