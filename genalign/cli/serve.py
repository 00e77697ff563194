"""``genalign serve-reward``: a reward in its own process over HTTP (genalign.rewards.service)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from genalign.cli.options import device, positive_int
from genalign.core.config import ConfigError


def add_commands(groups: dict[str, Any]) -> None:
    p = groups["root"].add_parser(
        "serve-reward", help="serve a reward over HTTP for training configs with reward: {name: remote, ...}")
    p.add_argument("target", help="a registered reward name (e.g. shapes_gold, pickscore) or a YAML file whose "
                                  "reward section (one reward, a weighted-sum list or an ensemble) is served")
    p.add_argument("--path", help="the reward's weights (with a reward name)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an adapter option (with a reward name; repeatable; VALUE read as YAML)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-env", default="GENALIGN_REWARD_TOKEN",
                   help="environment variable holding a shared token; when it is set, requests must carry it")
    p.add_argument("--max-batch", type=positive_int, default=16, help="images scored together at most")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--max-request-mb", type=float, default=256.0, help="the largest request body taken")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.set_defaults(func=cmd_serve_reward)


def reward_configs(args: argparse.Namespace) -> list[Any]:
    """The served reward's configs: a YAML file's reward section, or a name with --path / --option."""
    import yaml

    from genalign.core.config import from_dict
    from genalign.core.experiment import RewardConfig

    if args.target.endswith((".yaml", ".yml")) or Path(args.target).is_file():
        data = yaml.safe_load(Path(args.target).read_text())
        # a training config's reward section, or a file that is one reward mapping ({name: ...})
        section = (data.get("reward") if "reward" in data else data if "name" in data else None) \
            if isinstance(data, dict) else None
        rewards = [section] if isinstance(section, dict) else section
        if not isinstance(rewards, list) or not rewards:
            raise ConfigError(f"{args.target}: no reward section (a mapping with name, or a list of them)")
        return [from_dict(RewardConfig, r, args.target, f"reward[{i}].") for i, r in enumerate(rewards)]
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--option takes KEY=VALUE, got {item!r}")
        options[key] = yaml.safe_load(value)
    return [RewardConfig(name=args.target, path=args.path, options=options)]


def cmd_serve_reward(args: argparse.Namespace) -> int:
    import uvicorn

    from genalign.rewards import build_reward
    from genalign.rewards.service import make_app

    if args.max_wait_ms < 0 or args.max_request_mb <= 0:
        raise ConfigError("--max-wait-ms must be >= 0 and --max-request-mb > 0")
    reward = build_reward(reward_configs(args), device(args.device))
    token = os.environ.get(args.token_env) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"warning: serving on {args.host} without a token (set {args.token_env})")
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} over plain HTTP: the token travels unencrypted (use a trusted "
              "network or a TLS proxy in front)")
    app = make_app(reward, args.max_batch, args.max_wait_ms / 1000, token, int(args.max_request_mb * 2**20))
    url = f"http://{args.host}:{args.port}"
    print(f"serving reward {reward.label} on {url} (batches of up to {args.max_batch} images"
          f"{', token required' if token else ''}); in a training config:\n"
          f"  reward: {{name: remote, options: {{url: \"{url}\"}}}}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
