"""espeak-ng's C library behind a pipe: loaded once, each utterance spoken in a fork of the loaded process.

Run as a script (`python espeak_server.py`; standard library only, so it starts in milliseconds) by
`tts.EspeakTTS(in_process=True)`. The library keeps state from one utterance to the next (its wave
generator's phases and filters, libc's rand() for breath and flutter), so the same text and voice spoken
twice in one process differ. A fork of the freshly initialised server speaks each utterance from the same
state, which gives what the espeak-ng command gives, without starting a process and loading the voice data
each time. Protocol (little-endian): the server first writes its sample rate (int32); a request is int32
lengths of text and voice name, int32 speed (words/min) and pitch (0..99), then the UTF-8 text and voice
name; the reply is int32 n then n bytes: int16 PCM when n >= 0, else an error message of -n bytes.
"""

import ctypes
import ctypes.util
import os
import struct
import sys

# espeak_lib.h: AUDIO_OUTPUT_SYNCHRONOUS, POS_CHARACTER, espeakCHARS_UTF8 | espeakENDPAUSE (what the command
# passes, bar espeakPHONEMES: a caption's "[[...]]" is read as text), espeakRATE, espeakPITCH.
SYNCHRONOUS, POS_CHARACTER, FLAGS, RATE, PITCH = 2, 1, 0x1 | 0x1000, 1, 3
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _read(stream, n: int) -> bytes:
  data = stream.read(n)
  if len(data) != n:
    raise EOFError
  return data


def _speak(lib, text: bytes, voice: bytes, speed: int, pitch: int) -> bytes:
  chunks = []

  def collect(wav, num_samples, events):
    if num_samples > 0:
      chunks.append(ctypes.string_at(wav, 2 * num_samples))
    return 0

  callback = CALLBACK(collect)
  lib.espeak_SetSynthCallback(callback)
  if lib.espeak_SetVoiceByName(voice) != 0:
    raise RuntimeError(f"espeak-ng has no voice '{voice.decode()}'")
  lib.espeak_SetParameter(RATE, speed, 0)
  lib.espeak_SetParameter(PITCH, pitch, 0)
  status = lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, FLAGS, None, None)
  if status != 0:
    raise RuntimeError(f"espeak_Synth failed ({status})")
  return b"".join(chunks)


def main() -> None:
  stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
  lib = ctypes.CDLL(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
  lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                               ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
  lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  stdout.write(struct.pack("<i", lib.espeak_Initialize(SYNCHRONOUS, 0, None, 0)))
  stdout.flush()
  while True:
    try:
      text_len, voice_len, speed, pitch = struct.unpack("<4i", _read(stdin, 16))
      text, voice = _read(stdin, text_len), _read(stdin, voice_len)
    except EOFError:  # the client is gone
      return
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: speak from the freshly initialised state, reply through the pipe, exit
      os.close(read_fd)
      try:
        reply = _speak(lib, text, voice, speed, pitch)
        reply = struct.pack("<i", len(reply)) + reply
      except Exception as e:  # noqa: BLE001 - whatever went wrong goes back to the client as text
        message = f"{type(e).__name__}: {e}".encode()[:500]
        reply = struct.pack("<i", -len(message)) + message
      with os.fdopen(write_fd, "wb") as out:
        out.write(reply)
      os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
      reply = pipe.read()
    _, status = os.waitpid(pid, 0)
    if len(reply) < 4:
      message = f"the speaking process died (wait status {status})".encode()
      reply = struct.pack("<i", -len(message)) + message
    stdout.write(reply)
    stdout.flush()


if __name__ == "__main__":
  main()
