"""tokenmill: raw text to a trained, compressed, served LLM.

One import namespace for the whole project:

* ``tokenmill.common.…``   the libraries (engines, clients, runtime), from the ``common/`` folder;
* ``tokenmill.services.…`` the gRPC services, thin shells over the libraries, from ``services/``;
* ``tokenmill.v1``         the generated gRPC stubs (``make proto``).

``common/`` and ``services/`` sit at the top of the checkout (the project's layout is part of its
specification). A built wheel places them inside this package (``setup.py``); in a source checkout
this package's search path also covers the checkout root, so ``tokenmill.common`` resolves to
``common/`` without an install. Nothing outside ``tokenmill`` is ever importable from an install.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE_DIR.parent

if not (_PACKAGE_DIR / "common").is_dir() and (_CHECKOUT / "common" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))
