"""Password rules for new passwords, after NIST SP 800-63B: a length floor and a blocklist.

The blocklist is zxcvbn's: 30,000 passwords from breach corpora plus common words, names,
keyboard walks, sequences, repeats, dates and l33t variants of all of them, and the words
of this context (the username, "fairlane"). A password is refused when zxcvbn estimates
fewer than a million guesses for it, i.e. when it is, or is a small variation of, something
an online guesser tries early. No composition rules (digits, symbols) are imposed.
"""

from __future__ import annotations

from zxcvbn import zxcvbn

MAX_PASSWORD = 1024
MIN_GUESSES = 1_000_000
# zxcvbn's cost grows quickly with length; a passphrase this long is in no list, and its
# first 64 characters decide whether it is a variation of one.
_CHECKED_PREFIX = 64
_LINE_BREAKS = str.maketrans("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029", " " * 10)
_CONTEXT_WORDS = ("fairlane", "fairlane-auth")


class WeakPassword(ValueError):
    pass


def check_new_password(password: str, *, username: str, min_length: int) -> None:
    """Raises WeakPassword with a message meant for the user."""
    if len(password) < min_length:
        raise WeakPassword(f"password must be at least {min_length} characters")
    if len(password) > MAX_PASSWORD:
        raise WeakPassword(f"password must be at most {MAX_PASSWORD} characters")
    if password.strip() == "" or len(set(password)) < 3:
        raise WeakPassword("password is too weak: use more distinct characters")
    # zxcvbn's date matcher raises on a line break next to digits (it reads "\n" as a
    # separator, then int()s it); as a guess, a line break is worth a space anyway.
    estimated = password[:_CHECKED_PREFIX].translate(_LINE_BREAKS)
    verdict = zxcvbn(estimated, user_inputs=[username, *_CONTEXT_WORDS])
    if verdict["guesses"] < MIN_GUESSES:
        hint = verdict["feedback"]["warning"] or "it is close to a common or breached password"
        raise WeakPassword(
            f"password is too common or easy to guess ({hint.rstrip('.')}); "
            "choose a longer phrase of unrelated words"
        )
