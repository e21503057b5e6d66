"""32 varied JSON schemas for the structured-output tests. Every string, array and number is
bounded so that even a weak model's output can finish well within max_tokens."""

from typing import Literal, Optional

from pydantic import BaseModel, Field

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=10)
    legs: int = Field(ge=0, le=8)


class Owner(BaseModel):
    owner: str = Field(max_length=10)
    pets: list[Pet] = Field(min_length=1, max_length=2)
    nickname: Optional[str] = Field(None, max_length=8)


SCHEMAS: list = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": NAME}, "required": ["ok"]},
    {"type": "object", "properties": {"address": {"type": "object", "properties": {
        "street": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "zip"]}},
     "required": ["address"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"digits": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                                 "minItems": 1, "maxItems": 4}}, "required": ["digits"]},
    {"type": "object", "properties": {"score": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["score"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "string", "maxLength": 5}, SMALL_INT]}},
     "required": ["value"]},
    {"type": "object", "properties": {"a": SMALL_INT, "b": NAME, "c": {"type": "boolean"}}, "required": ["a"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"version": {"const": "v1"}, "n": SMALL_INT}, "required": ["version", "n"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": SMALL_INT, "label": NAME}, "required": ["id", "label"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"l1": {"type": "object", "properties": {"l2": {"type": "object", "properties": {
        "l3": SMALL_INT}, "required": ["l3"]}}, "required": ["l2"]}}, "required": ["l1"]},
    {"type": "object", "properties": {"nothing": {"type": "null"}, "id": SMALL_INT}, "required": ["nothing", "id"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 50}},
     "required": ["n"]},
    {"type": "array", "items": SMALL_INT, "minItems": 2, "maxItems": 3},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"radius": SMALL_INT}, "required": ["radius"]},
        {"type": "object", "properties": {"w": SMALL_INT, "h": SMALL_INT}, "required": ["w", "h"]}]}},
     "required": ["shape"]},
    {"$defs": {"point": {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT}, "required": ["x", "y"]}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"]},
    {"type": "object", "properties": {"title": NAME, "subtitle": NAME}, "required": ["title"],
     "additionalProperties": False},
    {"type": "object", "properties": {"mode": {"enum": ["fast", "slow"]}, "enabled": {"type": "boolean"}},
     "required": ["mode", "enabled"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 4}}, "required": ["word"]},
    {"type": "object", "properties": {"maybe": {"type": ["string", "null"], "maxLength": 6}}, "required": ["maybe"]},
    {"type": "object", "properties": {"grid": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 2}}},
     "required": ["grid"]},
    {"type": "object", "properties": {"first": NAME, "last": NAME, "age": SMALL_INT, "city": NAME,
                                      "member": {"type": "boolean"}, "rank": {"enum": ["a", "b"]}},
     "required": ["first", "last", "age", "city", "member", "rank"]},
    Pet,
    Owner,
    {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$"}},
     "required": ["email"]},
    {"type": "object", "properties": {"ratio": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["ratio"]},
]
