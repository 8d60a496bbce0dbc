"""The address model (utils/netaddr.py): which address a process advertises, and on which interface.

On this machine only loopback is certain to exist; other interfaces are exercised between network
namespaces in test_multihost.py.
"""

import socket

import pytest

from mmdit.launch.address import main as address_main
from mmdit.utils.netaddr import AddressError, advertised, interface_addresses, interface_of, route_source


def test_the_loopback_interface_is_found_by_its_address():
    assert interface_addresses()["lo"] == "127.0.0.1"
    assert interface_of("127.0.0.1") == "lo" and interface_of("127.0.1.1") == "lo"


@pytest.mark.parametrize("setting,toward", [("", "127.0.0.1"), ("", "localhost"), ("lo", "10.1.2.3"),
                                            ("127.0.0.1", "10.1.2.3"), ("localhost", ""), ("route:127.0.0.1", ""),
                                            ("127.0.1.1", "")])
def test_a_loopback_setting_or_route_advertises_the_loopback_interface(setting, toward):
    where = advertised(setting, toward)
    assert (where.address, where.interface, where.loopback) == ("127.0.0.1", "lo", True)


def test_the_default_is_the_route_never_the_host_name():
    where = advertised("", "127.0.0.1")
    assert where.how == "the route to 127.0.0.1" and route_source("127.0.0.1") == "127.0.0.1"


@pytest.mark.parametrize("setting,words", [
    ("0.0.0.0", "0.0.0.0 is not the first IPv4 address of an interface"),  # a wildcard is no address
    ("192.0.2.77", "192.0.2.77 is not the first IPv4 address of an interface"),  # TEST-NET: never this host's
    ("no-such-host.invalid", "cannot resolve the host name 'no-such-host.invalid'"),
])
def test_an_address_this_host_cannot_listen_on_is_refused_naming_the_key(setting, words):
    with pytest.raises(AddressError) as e:
        advertised(setting, "127.0.0.1", key="service.advertise_host")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert "service.advertise_host" in str(e.value) or "cannot resolve" in str(e.value)


def test_the_job_script_helper_prints_the_address_or_one_line(capsys):
    assert address_main(["127.0.0.1"]) == 0 and capsys.readouterr().out == "127.0.0.1\n"
    assert address_main(["127.0.0.1", "lo"]) == 0 and capsys.readouterr().out == "127.0.0.1\n"
    assert address_main(["127.0.0.1", "192.0.2.77"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "192.0.2.77" in err


def test_the_host_name_may_resolve_to_loopback_and_is_not_asked():
    """The reason for the model: on this machine (as on many cluster images) the host name
    resolves to loopback, which a peer elsewhere could never reach."""
    resolved = socket.gethostbyname(socket.gethostname())
    assert advertised("", "127.0.0.1").how.startswith("the route to")
    assert resolved  # whatever it is, the model never used it
