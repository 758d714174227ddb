"""The sockets of this very process, found by sock_diag and its fds: a port
it listens on gets an owner, and a port already known (reserved, or from a
config) is never looked up, so a re-run on a box of many servers scans no
process's descriptors."""

import os
import socket

import pytest

import sstuning_ports as ports
import sstuning_procfs as procfs


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


def own_table():
    pid = os.getpid()
    return {pid: procfs.process_table()[pid]}


def test_a_listening_port_gets_its_owner(listener):
    table = own_table()
    (comm, _, _), pid = table[os.getpid()], os.getpid()
    found = ports.listening_ports({comm}, (listener, listener), table)
    assert found == {listener: f"{comm} (pid {pid})"}


def test_a_known_port_is_not_looked_up(listener, monkeypatch):
    table = own_table()
    comm = table[os.getpid()][0]

    def scanned(pid):
        raise AssertionError(f"the descriptors of pid {pid} were scanned")

    monkeypatch.setattr(ports, "_socket_inodes", scanned)
    assert ports.listening_ports({comm}, (listener, listener), table, known={listener}) == {}
