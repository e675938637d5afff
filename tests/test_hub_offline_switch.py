"""Review r41 (rev41): the hub probe's offline switch shared by loads in threads and given back whole under
huggingface_hub 0.x (whose per-thread session is made once, offline or not), and a sharded run's --limit that a
resume cannot raise, refused saying so."""

from __future__ import annotations

import socket
import threading

import pytest


def _no_dns(monkeypatch, first_waits: threading.Event | None = None, probing: threading.Event | None = None):
    """getaddrinfo that fails as on a machine without DNS; the first call (made from its probe thread) first says it
    is asking (``probing``) and waits for ``first_waits``, as a slow resolver does."""
    calls = []

    def getaddrinfo(host, *args, **kwargs):
        calls.append(host)
        if len(calls) == 1 and first_waits is not None:
            probing.set()
            first_waits.wait(1.5)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_two_loads_in_threads_keep_cache_only_while_either_runs_and_give_the_hubs_mode_back(monkeypatch):
    """Before: a load whose probe was still asking when another load had switched offline mode on saved that "on" as
    the mode to give back, so the process stayed cache-only for good after both; and the first load to end switched
    it off under the other, still loading."""
    from huggingface_hub import constants

    from qkhooks.models.load import _hub_cache_only_if_unresolvable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    a_inside, b_probing, b_inside, a_done = (threading.Event() for _ in range(4))
    _no_dns(monkeypatch, first_waits=a_inside, probing=b_probing)
    seen: dict[str, object] = {}

    def load_b() -> None:
        try:
            with _hub_cache_only_if_unresolvable() as host:
                seen["b_host"] = host
                seen["b_at_start"] = constants.HF_HUB_OFFLINE
                b_inside.set()
                a_done.wait(2)
                seen["b_after_a"] = constants.HF_HUB_OFFLINE  # b is still loading: still cache-only
        except BaseException as exc:  # noqa: BLE001 - reported below
            seen["b_error"] = exc

    b = threading.Thread(target=load_b)
    b.start()
    assert b_probing.wait(2)  # b's probe is asking the resolver
    with _hub_cache_only_if_unresolvable() as host:
        assert host == "huggingface.co" and constants.HF_HUB_OFFLINE is True
        a_inside.set()
        assert b_inside.wait(2)
    a_done.set()
    b.join(5)
    assert "b_error" not in seen, seen
    assert seen["b_host"] == "huggingface.co" and seen["b_at_start"] is True
    assert seen["b_after_a"] is True
    assert constants.HF_HUB_OFFLINE is False  # given back once both loads ended


def test_an_exception_or_ctrl_c_in_a_load_gives_the_hubs_mode_back(monkeypatch):
    from huggingface_hub import constants

    from qkhooks.models.load import _hub_cache_only_if_unresolvable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _no_dns(monkeypatch)
    for exc in (OSError("not cached"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with _hub_cache_only_if_unresolvable() as host:
                assert host == "huggingface.co" and constants.HF_HUB_OFFLINE is True
                raise exc
        assert constants.HF_HUB_OFFLINE is False
    with _hub_cache_only_if_unresolvable():  # and the next load switches it on again
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False


def test_a_custom_endpoints_host_is_the_one_probed(monkeypatch):
    from huggingface_hub import constants

    from qkhooks.models.load import _hub_unresolvable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hf-mirror.example:8443")
    calls = _no_dns(monkeypatch)
    assert _hub_unresolvable() == "hf-mirror.example" and calls == ["hf-mirror.example"]


def _session_offline() -> bool | None:
    """Whether huggingface_hub 0.x's session of this thread refuses every request as offline (None on 1.x, which asks
    the mode at each request)."""
    try:
        from huggingface_hub.utils import _http
        from huggingface_hub.utils._http import OfflineAdapter
    except ImportError:
        return None
    session = _http.get_session()
    if not hasattr(session, "get_adapter"):
        return None
    return isinstance(session.get_adapter("https://huggingface.co"), OfflineAdapter)


def test_huggingface_hub_0x_sessions_follow_the_switch_in_and_out(monkeypatch):
    """huggingface_hub 0.x reads HF_HUB_OFFLINE only when it makes a thread's session, which it then keeps: before,
    a session made during a cache-only load stayed offline after it (every later request of that thread refused, "unset
    HF_HUB_OFFLINE", with the mode off), and one made before the load kept asking the network inside it. Runs with
    the oldest allowed huggingface_hub (make test-oldest's overlay)."""
    from huggingface_hub import constants

    from qkhooks.models.load import _hub_cache_only_if_unresolvable

    if _session_offline() is None:
        pytest.skip("huggingface_hub >= 1.0 asks the offline mode at each request")
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it for the suite
    _no_dns(monkeypatch)
    reset_sessions()
    try:
        assert _session_offline() is False  # a session made before the load, as any earlier hub call leaves
        with _hub_cache_only_if_unresolvable():
            assert _session_offline() is True
        assert _session_offline() is False
    finally:
        monkeypatch.undo()
        reset_sessions()  # the suite's own mode again


def test_a_sharded_runs_limit_is_not_raised_by_a_resume_and_the_refusal_says_why(tmp_path):
    """README and --resume's help say a resume may raise --limit; a shard's block moves with the limit, so a sharded run
    cannot grow: before, the refusal was the generic "its config differs ... Resume with the same options"."""
    import h5py

    import qkhooks
    from test_spectrum_edits_and_dataparallel import _same_size_photos, _tiny_loaded

    names = [f"p{i}.png" for i in range(8)]
    _same_size_photos(tmp_path / "photos", names, seed=1)
    loaded, out = _tiny_loaded(), tmp_path / "s0.h5"
    kw = dict(layers="0", modes=2, batch_size=2, progress=False, shard=(0, 2))
    qkhooks.record_dataset(loaded, str(tmp_path / "photos"), out, limit=4, **kw)
    with h5py.File(out, "r") as f:
        before = (f.attrs["config"], list(f["images/ids"][:].astype(str)))
    with pytest.raises(qkhooks.QKHooksError, match=r"--limit 6.*shard 0 of 2.*--limit 4.*limit cannot change.*Resume it with --limit 4") as caught:
        qkhooks.record_dataset(loaded, str(tmp_path / "photos"), out, limit=6, resume=True, **kw)
    assert str(caught.value).endswith("or record the larger run into a new --out.")  # the whole fix (mutation r41)
    with h5py.File(out, "r") as f:
        assert (f.attrs["config"], list(f["images/ids"][:].astype(str))) == before
