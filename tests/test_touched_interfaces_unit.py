"""What the datapath remembers about interfaces it attached to (state dir, no kernel)."""

from __future__ import annotations

from pathlib import Path

from nfctl.datapath.interfaces import TouchedInterfaces
from nfctl.manifest.model import Hook


def test_hooks_and_clsact_are_remembered_across_instances(tmp_path: Path) -> None:
    touched = TouchedInterfaces(tmp_path)
    touched.note_hook("eth0", 7, Hook.TC_INGRESS)
    touched.note_clsact_created("eth0")
    touched.note_hook("eth0", 7, Hook.XDP)
    again = TouchedInterfaces(tmp_path)  # as after an agent restart
    assert again.all() == {
        "eth0": {"ifindex": 7, "hooks": ["tc-ingress", "xdp"], "created_clsact": True}
    }
    assert again.created_clsact("eth0")
    # XDP does not use the clsact qdisc: only another TC hook keeps it
    assert not again.other_tc_hook_in_use("eth0", Hook.TC_INGRESS)
    again.note_hook("eth0", 7, Hook.TC_EGRESS)
    assert again.other_tc_hook_in_use("eth0", Hook.TC_INGRESS)


def test_a_new_ifindex_is_a_new_interface(tmp_path: Path) -> None:
    touched = TouchedInterfaces(tmp_path)
    touched.note_hook("eth0", 7, Hook.TC_INGRESS)
    touched.note_clsact_created("eth0")
    touched.note_hook("eth0", 9, Hook.XDP)  # deleted and created again under the same name
    assert touched.all() == {"eth0": {"ifindex": 9, "hooks": ["xdp"], "created_clsact": False}}


def test_forgetting_the_last_hook_forgets_the_interface(tmp_path: Path) -> None:
    touched = TouchedInterfaces(tmp_path)
    touched.note_hook("eth0", 7, Hook.XDP)
    touched.note_hook("eth0", 7, Hook.TC_EGRESS)
    touched.forget_hook("eth0", Hook.XDP)
    assert touched.all() == {
        "eth0": {"ifindex": 7, "hooks": ["tc-egress"], "created_clsact": False}
    }
    touched.forget_hook("eth0", Hook.TC_EGRESS)
    assert touched.all() == {}
    touched.clear()
    assert not touched.path.exists()
