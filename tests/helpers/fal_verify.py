"""fal's documented webhook receiver, written out independently of common.domain.signing."""

from __future__ import annotations

import base64
import hashlib
import time


def fal_documented_verify(headers: dict[str, str], body: bytes, jwks: dict) -> bool:
    """The receiver procedure of fal's documentation ("Verifying Your Webhook",
    https://docs.fal.ai/model-apis/model-endpoints/webhooks), written out independently of
    common.domain.signing
    and with the same libraries: each JWKS key's `x` decoded with a plain base64.urlsafe_b64decode (which
    raises on missing padding: fal's keys are padded), PyNaCl's VerifyKey, a 300 s timestamp window, and
    the message request_id \\n user_id \\n timestamp \\n sha256hex(body)."""
    from nacl.encoding import HexEncoder
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    request_id = headers.get("X-Fal-Webhook-Request-Id")
    user_id = headers.get("X-Fal-Webhook-User-Id")
    timestamp = headers.get("X-Fal-Webhook-Timestamp")
    signature_hex = headers.get("X-Fal-Webhook-Signature")
    if not all((request_id, user_id, timestamp, signature_hex)):
        return False
    try:
        if abs(int(time.time()) - int(timestamp)) > 300:
            return False
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        return False
    signed = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode("utf-8")
    for key in jwks["keys"]:
        x = key.get("x")
        if not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x)  # as the docs do: no re-padding
            VerifyKey(raw.hex(), encoder=HexEncoder).verify(signed, signature)
            return True
        except (BadSignatureError, ValueError):  # binascii.Error (bad padding) is a ValueError
            continue
    return False
