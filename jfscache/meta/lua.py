"""Lua scripts for every metadata mutation that touches more than one key.

Redis runs a script atomically, so two nodes mounting one volume never see a
half-done create, rename or unlink, and each FUSE operation costs one round
trip. Scripts report POSIX failures as error replies named after the errno
("ENOENT"), which the engine turns into OSError.

Key space (one Redis database per volume):
  setting            JSON volume settings
  i<ino>             hash: type mode uid gid rdev nlink length atime mtime ctime parent xattr
                     (times are nanosecond integers kept as strings: Lua numbers
                     are doubles and would round them, so scripts never do arithmetic on them;
                     xattr is '0' when the inode has no extended attributes, so that the
                     common "none" answer needs no second key)
  d<ino>             hash: name -> <type char><ino>
  c<ino>_<indx>      list of packed slices of chunk indx (newest last)
  k<ino>             zset of the chunk indexes of a file that have slices (score = index):
                     truncate and delete visit the chunks that exist, never 0..length
  x<ino>             hash: xattr name -> value
  s<ino>             symlink target
  nextinode nextslice nextsession usedSpace totalInodes   counters
  sessions           zset: sid -> last heartbeat (unix seconds)
  sessionInfos       hash: sid -> JSON
  sustained<sid>     set of inodes unlinked while open in that session
  delfiles           zset: "<ino>:<length>" -> time; data waiting to be deleted
  delslices          list of packed slices whose blocks wait to be deleted
  delchunks          list of names of cut chunk lists (renamed c-keys) waiting to be deleted
  compacted          zset: packed slice -> when a compaction replaced it; deleted after a grace period
  sliceRef           hash: slice id -> extra references (an appended slice split over two chunks)
  sliceUnref         hash: slice id -> the reference already dropped (see UNREF)

Offsets and lengths stay below MAX_FILE_SIZE (2^50), where Lua's doubles are
exact; numbers go back to Redis through num(), never through Lua's own
number formatting, which switches to exponent notation for large values.
"""
from .redisio import Script

# Attribute fields in the fixed order in which scripts and the engine read them.
ATTR_FIELDS = ("type", "mode", "uid", "gid", "rdev", "nlink", "length", "atime", "mtime", "ctime", "parent",
               "xattr")
_HMGET = "redis.call('HMGET', %s, " + ", ".join(f"'{f}'" for f in ATTR_FIELDS) + ")"

# Shared Lua helpers, prepended to scripts that need them.
_COMMON = r"""
local function fail(e) return redis.error_reply(e) end
local function align4k(n) return math.ceil(n / 4096) * 4096 end
local function num(n) return string.format('%.0f', n) end
local function dir_ok(pk)
  local p = redis.call('HMGET', pk, 'type', 'nlink', 'mode', 'gid')
  if not p[1] then return nil, 'ENOENT' end
  if p[1] ~= 'd' then return nil, 'ENOTDIR' end
  if tonumber(p[2]) == 0 then return nil, 'ENOENT' end
  return p, nil
end
local function touch_dir(pk, now)
  redis.call('HSET', pk, 'mtime', now, 'ctime', now)
end
"""

# KEYS: d<parent>   ARGV: name
# A file's first chunk comes along: an open() right after the lookup then
# needs no round trip of its own (most files read after a lookup are small).
LOOKUP = Script(r"""
local e = redis.call('HGET', KEYS[1], ARGV[1])
if not e then return nil end
local ino = string.sub(e, 2)
local chunk = {}
if string.sub(e, 1, 1) == 'f' then chunk = redis.call('LRANGE', 'c' .. ino .. '_0', 0, -1) end
return {e, """ + _HMGET % "'i' .. ino" + """, chunk}
""", read_only=True)

# KEYS: i<parent> d<parent> i<ino>
# ARGV: name ino type mode uid gid rdev now target max_inodes parent
# Returns: mode, gid, the parent's attributes (ATTR_FIELDS)
CREATE = Script(_COMMON + r"""
local p, err = dir_ok(KEYS[1])
if err then return fail(err) end
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then return fail('EEXIST') end
local maxi = tonumber(ARGV[10])
if maxi > 0 and tonumber(redis.call('GET', 'totalInodes') or '0') >= maxi then return fail('ENOSPC') end
local typ = ARGV[3]
local mode = tonumber(ARGV[4])
local gid = ARGV[6]
-- A setgid directory hands its group down, and its setgid bit to subdirectories.
if bit.band(tonumber(p[3]), 1024) ~= 0 then
  gid = p[4]
  if typ == 'd' then mode = bit.bor(mode, 1024) end
end
local nlink = 1
local length = 0
if typ == 'd' then nlink = 2 end
if typ == 'l' then length = string.len(ARGV[9]) end
redis.call('HSET', KEYS[3], 'type', typ, 'mode', mode, 'uid', ARGV[5], 'gid', gid, 'rdev', ARGV[7],
           'nlink', nlink, 'length', length, 'atime', ARGV[8], 'mtime', ARGV[8], 'ctime', ARGV[8],
           'parent', ARGV[11], 'xattr', '0')
if typ == 'l' then redis.call('SET', 's' .. ARGV[2], ARGV[9]) end
redis.call('HSET', KEYS[2], ARGV[1], typ .. ARGV[2])
touch_dir(KEYS[1], ARGV[8])
if typ == 'd' then redis.call('HINCRBY', KEYS[1], 'nlink', 1) end
redis.call('INCR', 'totalInodes')
-- The parent's new attributes come back too: the kernel asks for them right
-- after a create (to check the next one's permissions), so this saves a trip.
return {mode, gid, """ + _HMGET % "KEYS[1]" + """}
""")

# Removes an inode whose last link is gone and which no handle keeps open.
# Its data is queued in delfiles for the background deleter.
_DROP_INODE = r"""
local function drop_inode(ino, now_s)
  local ik = 'i' .. ino
  local a = redis.call('HMGET', ik, 'type', 'length')
  if not a[1] then return end
  redis.call('DEL', ik, 'x' .. ino, 's' .. ino, 'd' .. ino)
  redis.call('DECR', 'totalInodes')
  if a[1] == 'f' then
    local len = tonumber(a[2])
    redis.call('DECRBY', 'usedSpace', num(align4k(len)))
    -- The chunks (k<ino>) are deleted by the background deleter in batches.
    if redis.call('EXISTS', 'k' .. ino) == 1 then redis.call('ZADD', 'delfiles', now_s, ino .. ':' .. a[2]) end
  end
end
-- One link of a non-directory goes away. Returns 1 when a file reached
-- nlink 0 and waits in sustained<sid> until the caller knows whether a
-- handle keeps it open.
local function unlink_inode(typ, ino, now, sid, now_s)
  local ik = 'i' .. ino
  local n = redis.call('HINCRBY', ik, 'nlink', -1)
  redis.call('HSET', ik, 'ctime', now)
  if n > 0 then return 0 end
  if typ == 'f' then
    redis.call('SADD', 'sustained' .. sid, ino)
    return 1
  end
  drop_inode(ino, now_s)
  return 0
end
"""

# KEYS: i<parent> d<parent>   ARGV: name now sid now_s
UNLINK = Script(_COMMON + _DROP_INODE + r"""
local e = redis.call('HGET', KEYS[2], ARGV[1])
if not e then return fail('ENOENT') end
local typ = string.sub(e, 1, 1)
local ino = string.sub(e, 2)
if typ == 'd' then return fail('EISDIR') end
redis.call('HDEL', KEYS[2], ARGV[1])
touch_dir(KEYS[1], ARGV[2])
return {ino, unlink_inode(typ, ino, ARGV[2], ARGV[3], ARGV[4])}
""")

# ARGV: ino sid now_s. Called when a sustained inode's last handle closes.
DROP = Script(_COMMON + _DROP_INODE + r"""
redis.call('SREM', 'sustained' .. ARGV[2], ARGV[1])
local n = redis.call('HGET', 'i' .. ARGV[1], 'nlink')
if n and tonumber(n) > 0 then return 0 end
drop_inode(ARGV[1], ARGV[3])
return 1
""", idempotent=True)  # a second run finds the inode gone

# KEYS: i<parent> d<parent>   ARGV: name now
RMDIR = Script(_COMMON + r"""
local e = redis.call('HGET', KEYS[2], ARGV[1])
if not e then return fail('ENOENT') end
if string.sub(e, 1, 1) ~= 'd' then return fail('ENOTDIR') end
local ino = string.sub(e, 2)
if redis.call('HLEN', 'd' .. ino) > 0 then return fail('ENOTEMPTY') end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', 'i' .. ino, 'd' .. ino, 'x' .. ino)
redis.call('HINCRBY', KEYS[1], 'nlink', -1)
touch_dir(KEYS[1], ARGV[2])
redis.call('DECR', 'totalInodes')
return ino
""")

# KEYS: i<psrc> d<psrc> i<pdst> d<pdst>
# ARGV: nsrc ndst flags(0, 1=NOREPLACE, 2=EXCHANGE) now sid now_s
# Returns {moved ino, replaced ino or '', 1 if the replaced file waits in sustained}.
RENAME = Script(_COMMON + _DROP_INODE + r"""
local psrc = string.sub(KEYS[1], 2)
local pdst = string.sub(KEYS[3], 2)
local now = ARGV[4]
local se = redis.call('HGET', KEYS[2], ARGV[1])
if not se then return fail('ENOENT') end
local _, err = dir_ok(KEYS[3])
if err then return fail(err) end
local st = string.sub(se, 1, 1)
local sino = string.sub(se, 2)
local flags = tonumber(ARGV[3])
local de = redis.call('HGET', KEYS[4], ARGV[2])
if psrc == pdst and ARGV[1] == ARGV[2] then return {sino, '', 0} end
local dt, dino = nil, ''
if de then
  if flags == 1 then return fail('EEXIST') end
  dt = string.sub(de, 1, 1)
  dino = string.sub(de, 2)
  -- Two hard links of one inode: POSIX says rename does nothing.
  if dino == sino and flags ~= 2 then return {sino, '', 0} end
elseif flags == 2 then
  return fail('ENOENT')
end
-- Is directory `a` the directory `b` or one of its ancestors?
local function contains(a, b)
  local x = b
  for _ = 1, 100000 do
    if x == a then return true end
    if x == '1' or not x then return false end
    x = redis.call('HGET', 'i' .. x, 'parent')
  end
  return false
end
if psrc ~= pdst then
  if st == 'd' and contains(sino, pdst) then return fail('EINVAL') end
  if flags == 2 and dt == 'd' and contains(dino, psrc) then return fail('EINVAL') end
end
-- A directory changes parent: its '..' and both parents' link counts follow.
local function reparent(ino, from_key, to_key, to_ino)
  redis.call('HSET', 'i' .. ino, 'parent', to_ino)
  redis.call('HINCRBY', from_key, 'nlink', -1)
  redis.call('HINCRBY', to_key, 'nlink', 1)
end
local sustained = 0
if flags == 2 then
  redis.call('HSET', KEYS[2], ARGV[1], de)
  redis.call('HSET', KEYS[4], ARGV[2], se)
  if psrc ~= pdst then
    if st == 'd' then reparent(sino, KEYS[1], KEYS[3], pdst) end
    if dt == 'd' then reparent(dino, KEYS[3], KEYS[1], psrc) end
  end
  redis.call('HSET', 'i' .. dino, 'ctime', now)
else
  if de then
    if st == 'd' then
      if dt ~= 'd' then return fail('ENOTDIR') end
      if redis.call('HLEN', 'd' .. dino) > 0 then return fail('ENOTEMPTY') end
    elseif dt == 'd' then
      return fail('EISDIR')
    end
    if dt == 'd' then
      redis.call('DEL', 'i' .. dino, 'd' .. dino, 'x' .. dino)
      redis.call('DECR', 'totalInodes')
      redis.call('HINCRBY', KEYS[3], 'nlink', -1)
    else
      sustained = unlink_inode(dt, dino, now, ARGV[5], ARGV[6])
    end
  end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[2], se)
  if st == 'd' and psrc ~= pdst then reparent(sino, KEYS[1], KEYS[3], pdst) end
end
redis.call('HSET', 'i' .. sino, 'ctime', now)
touch_dir(KEYS[1], now)
if psrc ~= pdst then touch_dir(KEYS[3], now) end
return {sino, dino, sustained}
""")

# KEYS: i<ino> i<newparent> d<newparent>   ARGV: name now ino
LINK = Script(_COMMON + r"""
local a = redis.call('HMGET', KEYS[1], 'type', 'nlink')
if not a[1] then return fail('ENOENT') end
if a[1] == 'd' then return fail('EPERM') end
local _, err = dir_ok(KEYS[2])
if err then return fail(err) end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return fail('EEXIST') end
redis.call('HSET', KEYS[3], ARGV[1], a[1] .. ARGV[3])
redis.call('HINCRBY', KEYS[1], 'nlink', 1)
redis.call('HSET', KEYS[1], 'ctime', ARGV[2])
touch_dir(KEYS[2], ARGV[2])
return """ + _HMGET % "KEYS[1]" + """
""")

# KEYS: i<ino>   ARGV: now field value [field value ...]
SETATTR = Script(r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('ENOENT') end
redis.call('HSET', KEYS[1], 'ctime', ARGV[1], unpack(ARGV, 2))
return """ + _HMGET % "KEYS[1]" + """
""", idempotent=True)  # sets fields

# KEYS: i<ino> k<ino>   ARGV: new_length now chunk_size capacity(0 = none) ino
# Shrinking covers the cut part of the boundary chunk with a zero slice (id 0)
# and moves the chunks past the end out of the file (renamed, queued in
# delchunks for the background deleter), so bytes past the length are always
# absent or zero and growing again reads zeros. It visits only the chunks that
# exist (k<ino>), one O(1) RENAME each: a sparse file of any length truncates
# in time proportional to what was written, never to its offsets.
TRUNCATE = Script(_COMMON + r"""
local a = redis.call('HMGET', KEYS[1], 'type', 'length')
if not a[1] then return fail('ENOENT') end
if a[1] ~= 'f' then return fail('EISDIR') end
local old = tonumber(a[2])
local new = tonumber(ARGV[1])
local C = tonumber(ARGV[3])
local ino = ARGV[5]
local delta = align4k(new) - align4k(old)
local cap = tonumber(ARGV[4])
if delta > 0 and cap > 0 and tonumber(redis.call('GET', 'usedSpace') or '0') + delta > cap then
  return fail('ENOSPC')
end
if new < old then
  local first = math.floor(new / C)
  local from = first
  if new % C ~= 0 then
    local pos = new % C
    local stop = math.min(C, old - first * C)
    if redis.call('ZSCORE', KEYS[2], num(first)) then
      redis.call('RPUSH', 'c' .. ino .. '_' .. num(first), struct.pack('>I4I8I4I4I4', pos, 0, 0, 0, stop - pos))
    end
    from = first + 1
  end
  local cut = redis.call('ZRANGEBYSCORE', KEYS[2], num(from), '+inf')
  if #cut > 0 then
    local base = redis.call('INCRBY', 'nextdelchunk', #cut) - #cut
    for j, i in ipairs(cut) do
      local g = 'g' .. num(base + j)
      redis.call('RENAME', 'c' .. ino .. '_' .. i, g)
      redis.call('RPUSH', 'delchunks', g)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], num(from), '+inf')
  end
end
redis.call('INCRBY', 'usedSpace', num(delta))
redis.call('HSET', KEYS[1], 'length', ARGV[1], 'mtime', ARGV[2], 'ctime', ARGV[2])
return """ + _HMGET % "KEYS[1]" + """
""", idempotent=True)  # a second run finds the length already set

# Commit one written slice. Its blocks are already in the object store.
# KEYS: i<ino> c<ino>_<indx> k<ino>   ARGV: packed slice, end offset in file, now, capacity, indx
WRITE = Script(_COMMON + r"""
local a = redis.call('HMGET', KEYS[1], 'type', 'length')
if not a[1] then return fail('ENOENT') end
local old = tonumber(a[2])
local e = tonumber(ARGV[2])
if e > old then
  local delta = align4k(e) - align4k(old)
  local cap = tonumber(ARGV[4])
  if cap > 0 and tonumber(redis.call('GET', 'usedSpace') or '0') + delta > cap then return fail('ENOSPC') end
  redis.call('INCRBY', 'usedSpace', num(delta))
  redis.call('HSET', KEYS[1], 'length', ARGV[2])
  old = e
end
local count = redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[5])
redis.call('HSET', KEYS[1], 'mtime', ARGV[3], 'ctime', ARGV[3])
return {num(old), count}
""", idempotent=True)  # a second run appends the same slice again, which reads the same (newest wins) and changes no length or space

# Commit appended bytes (one uploaded slice of n bytes) at the file's true end,
# whatever length the writer's node had cached: appends from many nodes all
# land, none over another. The slice is split over two chunks if it crosses
# a chunk boundary (so it must be at most one chunk long).
# KEYS: i<ino> k<ino>   ARGV: slice id, n, now, capacity, chunk size, max file size, ino
# A slice split over two chunks is referenced twice (sliceRef): its objects are
# deleted when both references are gone. Returns {new length, longest list}.
APPEND = Script(_COMMON + r"""
local a = redis.call('HMGET', KEYS[1], 'type', 'length')
if not a[1] then return fail('ENOENT') end
if a[1] ~= 'f' then return fail('EISDIR') end
local old = tonumber(a[2])
local n = tonumber(ARGV[2])
local C = tonumber(ARGV[5])
local e = old + n
if e > tonumber(ARGV[6]) then return fail('EFBIG') end
local delta = align4k(e) - align4k(old)
local cap = tonumber(ARGV[4])
if cap > 0 and tonumber(redis.call('GET', 'usedSpace') or '0') + delta > cap then return fail('ENOSPC') end
local done, count = 0, 0
while done < n do
  local indx = math.floor((old + done) / C)
  local pos = (old + done) % C
  local take = math.min(n - done, C - pos)
  count = math.max(count, redis.call('RPUSH', 'c' .. ARGV[7] .. '_' .. num(indx),
                                     struct.pack('>I4I8I4I4I4', pos, tonumber(ARGV[1]), n, done, take)))
  redis.call('ZADD', KEYS[2], num(indx), num(indx))
  if done > 0 then redis.call('HINCRBY', 'sliceRef', ARGV[1], 1) end
  done = done + take
end
redis.call('INCRBY', 'usedSpace', num(delta))
redis.call('HSET', KEYS[1], 'length', num(e), 'mtime', ARGV[3], 'ctime', ARGV[3])
return {num(e), count}
""")

# Replace the first k slices of a chunk (exactly those the compactor read;
# slices appended since stay after them) with new slices holding what they
# showed (packed, 24 bytes each, not overlapping). The old slices wait in `compacted` (score: when) for the deleter,
# which leaves them a grace period: a reader that resolved the old list
# before this can still fetch their blocks.
# KEYS: c<ino>_<indx>   ARGV: k, the k packed slices concatenated, the new packed slices, now_s
# Returns 1, or 0 when the chunk changed under the compactor (nothing done).
COMPACT = Script(r"""
local k = tonumber(ARGV[1])
local old = redis.call('LRANGE', KEYS[1], 0, k - 1)
if #old ~= k or table.concat(old) ~= ARGV[2] then return 0 end
redis.call('LTRIM', KEYS[1], k, -1)
for i = string.len(ARGV[3]) - 23, 1, -24 do
  redis.call('LPUSH', KEYS[1], string.sub(ARGV[3], i, i + 23))
end
for _, s in ipairs(old) do
  if struct.unpack('>I8', s, 5) ~= 0 then redis.call('ZADD', 'compacted', ARGV[4], s) end
end
return 1
""")

# One reference to a slice's objects goes away; 1 if it was the last (delete
# them). Slices without a sliceRef entry have one reference.
# ARGV: slice id, which reference (the entry's offset:length in the slice:
# the two parts of a split slice differ there). Dropping the first of two
# references is remembered in sliceUnref, so that running it again after a
# lost reply does not drop the second too and delete objects a chunk still
# reads. Running the last drop again only deletes deleted objects again.
UNREF = Script(r"""
if redis.call('HGET', 'sliceUnref', ARGV[1]) == ARGV[2] then return 0 end
local n = redis.call('HINCRBY', 'sliceRef', ARGV[1], -1)
if n < 0 then
  redis.call('HDEL', 'sliceRef', ARGV[1])
  redis.call('HDEL', 'sliceUnref', ARGV[1])
  return 1
end
redis.call('HSET', 'sliceUnref', ARGV[1], ARGV[2])
return 0
""", idempotent=True)  # see above

# KEYS: i<ino> x<ino>   ARGV: name value now
# (pyfuse3 checks XATTR_CREATE / XATTR_REPLACE itself, with a getxattr first.)
SETXATTR = Script(r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('ENOENT') end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], 'ctime', ARGV[3], 'xattr', '1')
return 1
""", idempotent=True)  # sets a field

# KEYS: i<ino> x<ino>   ARGV: name now
REMOVEXATTR = Script(r"""
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return redis.error_reply('ENODATA') end
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('HSET', KEYS[1], 'xattr', '0') end
redis.call('HSET', KEYS[1], 'ctime', ARGV[2])
return 1
""")

# ARGV: sid now_s. Ends a session: drops what it kept alive.
CLOSE_SESSION = Script(_COMMON + _DROP_INODE + r"""
local inos = redis.call('SMEMBERS', 'sustained' .. ARGV[1])
for _, ino in ipairs(inos) do
  local n = redis.call('HGET', 'i' .. ino, 'nlink')
  if not n or tonumber(n) == 0 then drop_inode(ino, ARGV[2]) end
end
redis.call('DEL', 'sustained' .. ARGV[1])
redis.call('ZREM', 'sessions', ARGV[1])
redis.call('HDEL', 'sessionInfos', ARGV[1])
return #inos
""", idempotent=True)  # a second run finds nothing left
