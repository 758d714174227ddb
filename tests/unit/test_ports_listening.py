"""The sockets of this very process, found by sock_diag and its fds: a port
it listens on gets an owner, and a port already known (reserved, or from a
config) is never looked up, so a re-run on a box of many servers scans no
process's descriptors; nor is a process whose command line names the ports
the kernel shows listening."""

import os
import socket
import subprocess
import sys

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


@pytest.mark.parametrize("argv, found", [
    (["ss-server", "-s", "0.0.0.0", "-p", "8388", "-k", "9000"], {8388}),
    (["ssserver", "--server-addr=[::]:8389"], {8389}),
    (["ssserver", "-s", "0.0.0.0:8390", "-b", "127.0.0.1:1080"], {8390, 1080}),
    (["ss-manager", "--manager-address", "/var/run/ss-manager.sock"], set()),
    (["ss-server", "-p", "70000"], set()),
    (["ss-server", "-p"], set()),
])
def test_the_ports_a_command_line_names(argv, found):
    assert ports.declared_ports(argv, ["-p", "-s", "--server-addr", "-b", "--manager-address"]) == found


@pytest.fixture
def child_listening(listener_socket):
    """A real child process that holds a listening socket and names ports on
    its command line: ``start(*args)`` -> (pid, comm)."""
    children = []

    def start(*args):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *map(str, args)],
                                 pass_fds=[listener_socket.fileno()])
        children.append(child)
        return child.pid, procfs.proc_stat(child.pid)[0]

    yield start
    for child in children:
        child.kill()
        child.wait()


@pytest.fixture
def listener_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock
    sock.close()


def test_a_port_its_command_line_names_and_the_kernel_shows_listening_needs_no_descriptor_scan(
        listener_socket, child_listening, monkeypatch):
    port = listener_socket.getsockname()[1]
    pid, comm = child_listening("-p", port)

    def scanned(pid):
        raise AssertionError(f"the descriptors of pid {pid} were scanned")

    monkeypatch.setattr(ports, "_socket_inodes", scanned)
    found = ports.listening_ports({comm}, (port, port), {pid: (comm, "S", 1)}, port_options={comm: ["-p"]})
    assert found == {port: f"{comm} (pid {pid})"}


def test_a_command_line_port_nothing_listens_on_falls_back_to_the_descriptors(listener_socket, child_listening):
    # ss-local's -p names the remote server's port: nothing here listens on it.
    port = listener_socket.getsockname()[1]
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))  # bound, not listening: a port no socket listens on
        pid, comm = child_listening("-p", other.getsockname()[1])
        found = ports.listening_ports({comm}, (port, port), {pid: (comm, "S", 1)}, port_options={comm: ["-p"]})
    assert found == {port: f"{comm} (pid {pid})"}
