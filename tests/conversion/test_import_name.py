"""Users import the library as `attnonly`: the same objects the service uses."""
import attnonly
import shared.conversion
from shared.conversion.client import Client


def test_attnonly_is_the_library():
    assert attnonly.convert is shared.conversion.convert and attnonly.load_converted is shared.conversion.load_converted
    assert attnonly.Client is Client and set(attnonly.__all__) >= {"convert", "load_converted", "ConversionOptions"}
