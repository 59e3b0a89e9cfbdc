"""Typed aiohttp app state."""

from aiohttp import web

from bridge.services import Bridge

BRIDGE = web.AppKey("bridge", Bridge)
