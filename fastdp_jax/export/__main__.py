"""Checks or signs an exported model directory from the command line.

  python -m fastdp_jax.export verify runs/demo/model [--key-file KEY] [--digest HEX]
  python -m fastdp_jax.export sign runs/demo/model --key-file KEY

``verify`` makes every check of :func:`~fastdp_jax.export.predictor.load_model` (the files
against the manifest, the signature with ``--key-file``, the model digest with ``--digest``);
``sign`` checks the model, then writes ``MANIFEST.sha256.hmac`` with the key. A bad model or
key is one line ``error: ...`` on stderr and exit status 2.

Without ``--key-file``, ``verify`` checks integrity only (the files are the ones the manifest
names), not authenticity (who wrote the manifest): it says so, and a model that carries a
signature fails (exit status 2, one line), since a signature nobody checked proves nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fastdp_jax import errors
from fastdp_jax.export import layout
from fastdp_jax.export import model_dir
from fastdp_jax.export import predictor as predictor_lib


def _verify(path: str, key: bytes | None, digest: str | None) -> str:
  """The line ``verify`` prints for a sound model.

  Raises:
    errors.UserError: a model that fails a check, or a signed model checked without a key.
  """
  predictor = predictor_lib.load_model(path, key=key, expected_digest=digest)
  if predictor.signed:
    return f"{path}: ok, digest {predictor.digest}, signature ok"
  if model_dir.is_signed(path):
    raise errors.UserError(
        f"{path}: signed ({layout.SIGNATURE_FILE}) but no key was given, so the signature was "
        f"not checked (integrity only: ok, digest {predictor.digest}); pass --key-file KEY")
  return (f"{path}: ok (integrity only: no key given, the signature was not checked; the model "
          f"is unsigned), digest {predictor.digest}")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m fastdp_jax.export",
                              description="check or sign an exported model directory")
  sub = p.add_subparsers(dest="command", required=True)
  v = sub.add_parser("verify", help="check every file, the consistency and the signature")
  v.add_argument("path", help="the model directory (or the workdir holding model/)")
  v.add_argument("--key-file", help="the secret key it was signed with (without it: integrity "
                 "only, and a signed model fails)")
  v.add_argument("--digest", help="the model digest it must have")
  s = sub.add_parser("sign", help="check, then sign the manifest with a secret key")
  s.add_argument("path", help="the model directory (or the workdir holding model/)")
  s.add_argument("--key-file", required=True, help="a file of at least 16 secret bytes")
  args = p.parse_args(argv)
  try:
    key = model_dir.read_key_file(args.key_file) if args.key_file else None
    if args.command == "sign":
      digest = model_dir.sign_model(args.path, key)
      print(f"{args.path}: signed ({layout.SIGNATURE_FILE}), digest {digest}")
    else:
      print(_verify(args.path, key, args.digest))
  except (errors.UserError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return errors.USER_ERROR_EXIT_CODE
  return 0


if __name__ == "__main__":
  sys.exit(main())
