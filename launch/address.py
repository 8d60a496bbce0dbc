"""`python -m mmdit.launch.address HOST [SETTING]`: the address this host advertises toward HOST.

SETTING is a `service.advertise_host` value (an address, an interface, `route:PEER`); without it,
the local end of the route to HOST (utils/netaddr.py). The job script of `mmdit submit` asks the
first trainer node for its address on the job network this way: its own host name may resolve
to 127.0.0.1 there. Exit 1 with the reason on stderr when there is no such address.
"""

import sys

from mmdit.utils.netaddr import AddressError, advertised


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: python -m mmdit.launch.address HOST [SETTING]", file=sys.stderr)
        return 2
    try:
        print(advertised(argv[1] if len(argv) == 2 else "", argv[0]).address)
    except AddressError as e:
        print(f"mmdit: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
