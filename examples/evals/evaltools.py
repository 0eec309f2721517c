"""User tools for the routing suite (`evaltools:convert_units` and so on): a unit converter, a
weather lookup and a dictionary, all offline with canned data, so results are exact and repeatable.

Named evaltools, not tools: a module called `tools` would be shadowed by the repository's own
`tools/` package (the built-ins) whenever the current folder is on sys.path.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmos import tool

# factor to the base unit of each dimension (metre, kilogram, litre, second)
_UNITS = {
    "length": {"m": 1.0, "km": 1000.0, "cm": 0.01, "mm": 0.001, "mi": 1609.344, "yd": 0.9144, "ft": 0.3048, "in": 0.0254},
    "mass": {"kg": 1.0, "g": 0.001, "mg": 1e-6, "lb": 0.45359237, "oz": 0.028349523125, "t": 1000.0},
    "volume": {"l": 1.0, "ml": 0.001, "gal": 3.785411784, "qt": 0.946352946, "cup": 0.2365882365, "floz": 0.0295735295625},
    "time": {"s": 1.0, "min": 60.0, "h": 3600.0, "day": 86400.0, "week": 604800.0},
}
_ALIASES = {
    "meter": "m", "meters": "m", "metre": "m", "metres": "m", "kilometer": "km", "kilometers": "km", "kilometre": "km",
    "kilometres": "km", "centimeter": "cm", "centimeters": "cm", "centimetre": "cm", "centimetres": "cm",
    "millimeter": "mm", "millimeters": "mm", "mile": "mi", "miles": "mi", "yard": "yd", "yards": "yd", "foot": "ft",
    "feet": "ft", "inch": "in", "inches": "in", "kilogram": "kg", "kilograms": "kg", "kilo": "kg", "kilos": "kg",
    "gram": "g", "grams": "g", "milligram": "mg", "milligrams": "mg", "pound": "lb", "pounds": "lb", "lbs": "lb",
    "ounce": "oz", "ounces": "oz", "tonne": "t", "tonnes": "t", "liter": "l", "liters": "l", "litre": "l",
    "litres": "l", "milliliter": "ml", "milliliters": "ml", "millilitre": "ml", "millilitres": "ml", "gallon": "gal",
    "gallons": "gal", "quart": "qt", "quarts": "qt", "cups": "cup", "fl oz": "floz", "fluid ounce": "floz",
    "fluid ounces": "floz", "second": "s", "seconds": "s", "sec": "s", "minute": "min", "minutes": "min",
    "hour": "h", "hours": "h", "hr": "h", "days": "day", "weeks": "week",
    "c": "celsius", "°c": "celsius", "f": "fahrenheit", "°f": "fahrenheit", "k": "kelvin",
}


def _unit(name: str) -> str:
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def _to_celsius(value: float, unit: str) -> float:
    return {"celsius": value, "fahrenheit": (value - 32) * 5 / 9, "kelvin": value - 273.15}[unit]


def _from_celsius(value: float, unit: str) -> float:
    return {"celsius": value, "fahrenheit": value * 9 / 5 + 32, "kelvin": value + 273.15}[unit]


@tool
def convert_units(
    value: Annotated[float, Field(description="The amount to convert, e.g. 5")],
    from_unit: Annotated[str, Field(description="The unit it is in, e.g. 'km', 'pounds', 'fahrenheit'")],
    to_unit: Annotated[str, Field(description="The unit wanted, e.g. 'miles', 'kg', 'celsius'")],
) -> str:
    """Convert a quantity between units of length, mass, volume, time or temperature (km to miles, pounds to kilograms, Fahrenheit to Celsius, cups to millilitres, hours to minutes)."""
    src, dst = _unit(from_unit), _unit(to_unit)
    temps = ("celsius", "fahrenheit", "kelvin")
    if src in temps and dst in temps:
        result = _from_celsius(_to_celsius(value, src), dst)
    else:
        dimension = next((d for d, units in _UNITS.items() if src in units and dst in units), None)
        if dimension is None:
            raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r}; known units: "
                             + ", ".join(u for units in _UNITS.values() for u in units) + ", celsius, fahrenheit, kelvin")
        result = value * _UNITS[dimension][src] / _UNITS[dimension][dst]
    return f"{value:g} {from_unit} = {round(result, 4):g} {to_unit}"


_WEATHER = {
    "paris": ("light rain", 14, 82), "london": ("overcast", 12, 77), "tokyo": ("clear", 22, 55),
    "new york": ("sunny", 25, 48), "sydney": ("windy", 18, 60), "cairo": ("hot and sunny", 35, 20),
    "reykjavik": ("snow showers", -2, 85), "berlin": ("partly cloudy", 16, 65), "mumbai": ("thunderstorms", 30, 90),
    "toronto": ("foggy", 9, 88), "lima": ("drizzle", 17, 84), "nairobi": ("mild and cloudy", 21, 62),
}


@tool
def get_weather(city: Annotated[str, Field(description="City name, e.g. 'Paris'")]) -> str:
    """Current weather for a city: conditions, temperature in °C and humidity (canned data for a dozen cities)."""
    key = city.strip().lower().split(",")[0]
    if key not in _WEATHER:
        return f"no weather data for {city!r}; known cities: " + ", ".join(c.title() for c in _WEATHER)
    sky, temp, humidity = _WEATHER[key]
    return f"{city.strip().title()}: {sky}, {temp} °C, humidity {humidity}%"


_WORDS = {
    "serendipity": "the occurrence of happy or useful events by chance",
    "ephemeral": "lasting for a very short time",
    "ubiquitous": "present, appearing or found everywhere",
    "laconic": "using very few words",
    "petrichor": "the pleasant earthy smell after rain falls on dry ground",
    "sonder": "the realisation that each passer-by has a life as vivid and complex as your own",
    "quixotic": "exceedingly idealistic; unrealistic and impractical",
    "mellifluous": "sweet or musical; pleasant to hear",
    "obfuscate": "to make something obscure, unclear or hard to understand",
    "gregarious": "fond of company; sociable",
    "halcyon": "denoting a period of time in the past that was idyllically happy and peaceful",
    "pernicious": "having a harmful effect, especially in a gradual or subtle way",
}


@tool
def define_word(word: Annotated[str, Field(description="The English word to look up, e.g. 'ephemeral'")]) -> str:
    """Look up the meaning of an English word in the dictionary."""
    key = word.strip().lower()
    if key not in _WORDS:
        return f"{word!r} is not in this dictionary"
    return f"{key}: {_WORDS[key]}"
