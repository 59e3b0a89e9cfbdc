"""vodozemac 0.10: a pre-key message made on a fallback key still decrypts after ONE
rotation of the fallback key, not after two.  Run with .venv/bin/python."""
import base64

import vodozemac as v


def pre(m):
    _, ct = m.to_parts()
    ct = ct if isinstance(ct, str) else base64.b64encode(ct).decode().rstrip("=")
    return v.PreKeyMessage.from_base64(ct)


bob, alice = v.Account(), v.Account()
bob.generate_fallback_key()
fk = list(bob.fallback_key.values())[0]
bob.mark_keys_as_published()
m = alice.create_outbound_session(bob.curve25519_key, fk).encrypt(b"hi")
bob.generate_fallback_key(); bob.mark_keys_as_published()
print("after 1 rotation:", bob.create_inbound_session(alice.curve25519_key, pre(m))[1])
m2 = alice.create_outbound_session(bob.curve25519_key, fk).encrypt(b"again")
bob.generate_fallback_key(); bob.mark_keys_as_published()
try:
    print("after 2 rotations:", bob.create_inbound_session(alice.curve25519_key, pre(m2))[1])
except v.SessionCreationException as e:  # expected
    print("after 2 rotations: SessionCreationException", e)
