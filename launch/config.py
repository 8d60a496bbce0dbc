"""`mmdit config`: the job config a command line resolves to, and what each key means.

    mmdit config show [key=value ...]           the resolved config as YAML (what a job would run with)
    mmdit config explain KEY [key=value ...]    the key's doc, type, default, current value, and where
                                                that value comes from (a dataclass default, a conf/
                                                file, or the command line)

KEY is a dotted path (`optimizer.lr`, `data.filters.min_blur`, `data.category_weights.design`, a
whole section such as `data.filters`); a key that moved (`train.lr`) is explained under its new
name. An unknown key exits 2 with the keys it is close to.
"""

from mmdit.config.explain import sections
from mmdit.launch.args import Action, Command, parse

COMMAND = Command("config", __doc__, sections=tuple(sections()), actions=(
    Action("show", "the resolved config as YAML"),
    Action("explain", "a key's doc, type, default, current value and where it comes from",
           paths={"KEY": "a dotted key: optimizer.lr, data.filters.min_blur, service.heartbeat_s, ..."}),
))


def main(argv: list[str]) -> int:
    from mmdit.config.explain import explain
    from mmdit.config.loader import config_yaml, load_config

    args = parse(COMMAND, argv)
    if args.action == "show":
        print(config_yaml(load_config(args.overrides)), end="")
    else:
        print(explain(args.paths[0], args.overrides))
    return 0
