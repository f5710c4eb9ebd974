from django.urls import path

from . import views

urlpatterns = [
    path("peek", views.peek),
    path("work", views.work),
    path("boom", views.boom),
    path("download", views.download),
]
