"""The service on Ray Serve (the ``ray`` extra): ``deployment`` runs the app in every replica, ``proxy``
runs in Ray's HTTP proxy. Nothing else in app/ imports these, so ``python -m app`` never imports Ray."""
