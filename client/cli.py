"""Command lines of the user side: `potluck generate` and `potluck chat`."""
from __future__ import annotations

import argparse
import sys


def add_commands(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="continue a prompt through the swarm")
    generate.add_argument("prompt")
    _add_model_args(generate)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(run=_run_generate)

    chat = commands.add_parser("chat", help="chat with the model through the swarm")
    _add_model_args(chat)
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer per turn")
    chat.add_argument("--max-length", type=int, default=4096, help="longest conversation, in tokens")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(run=_run_chat)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder or HF id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model-name", default=None, help="the model's name in the swarm (default: from --model)")
    parser.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR",
                        help="multiaddrs of peers to join through (default: $POTLUCK_INITIAL_PEERS)")


def _load(args: argparse.Namespace):
    from transformers import AutoTokenizer

    from potluck.protocol.checkpoint import resolve_checkpoint

    from .model import AutoDistributedModelForCausalLM

    checkpoint = resolve_checkpoint(args.model, args.model_name)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(checkpoint.path), args.initial_peers,
                                                            model_name=checkpoint.name)
    return tokenizer, model


def _sampling(args: argparse.Namespace) -> dict:
    if args.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": getattr(args, "top_p", 1.0)}


def _run_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    if args.seed is not None:
        torch.manual_seed(args.seed)
    tokenizer, model = _load(args)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer, **_sampling(args))
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    tokenizer, model = _load(args)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting through the swarm. Empty line or Ctrl-D ends.", file=sys.stderr)
    with model.inference_session(max_length=args.max_length):
        while True:
            try:
                text = input("you> ").strip()
            except EOFError:
                break
            if not text:
                break
            messages.append({"role": "user", "content": text})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
            print("model> ", end="", flush=True)
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **_sampling(args))
            reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            messages.append({"role": "assistant", "content": reply})
    return 0
