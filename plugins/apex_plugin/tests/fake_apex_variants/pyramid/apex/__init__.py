"""FAKE of PyPI's ``apex`` 0.9.10.dev0 (2013), the unrelated Pyramid toolkit; not it.

What it imitates: ``pip install apex`` installs this Pyramid web toolkit ("Velruse,
Flash Messages, CSRF, ReCaptcha and Sessions"), not NVIDIA apex. Its
``apex/__init__.py`` (line 13) does
``from pyramid.session import UnencryptedCookieSessionFactoryConfig``, a name that
Pyramid 2.0 removed, so every ``import apex`` / ``from apex import amp`` fails with
``ImportError: cannot import name 'UnencryptedCookieSessionFactoryConfig' from
'pyramid.session' (unknown location)`` (NVIDIA/apex#1063, #1804).

Why: the availability check of the torchplug apex plugin must report such an
install as "unavailable" without crashing. Pyramid is not needed: the same
ImportError (message and ``name``) is raised directly.
"""

raise ImportError(
    "cannot import name 'UnencryptedCookieSessionFactoryConfig' from 'pyramid.session' (unknown location)",
    name="pyramid.session",
)
