-- KEYS: circuits. Returns their records, flattened. A key that holds
-- something else than a hash (not written by stalwart) reads as
-- {"foreign", 0, 0, 0, 0}, so that the records of the others are still read.
--#include _circuit
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local ok, r = pcall(record, key, now)
  if not ok then r = {'foreign', 0, 0, 0, 0} end
  for j = 1, 5 do out[#out + 1] = r[j] end
end
return out
