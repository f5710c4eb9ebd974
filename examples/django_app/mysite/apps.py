from django.apps import AppConfig


class MysiteConfig(AppConfig):
    name = "mysite"

    def ready(self) -> None:
        from django.core.signals import request_finished, request_started

        from . import signals

        request_started.connect(signals.on_request_started)
        request_finished.connect(signals.on_request_finished)
