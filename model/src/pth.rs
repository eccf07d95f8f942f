//! Reads a PyTorch state_dict saved with `torch.save` (the zip format: `<dir>/data.pkl` plus one
//! `<dir>/data/<key>` entry per storage) without Python and without executing anything: the pickle is
//! interpreted by a small stack machine that knows only the opcodes and the four callables a
//! state_dict uses (`OrderedDict`, `_rebuild_tensor_v2`, `_rebuild_parameter` and the storage types).
//! Any other callable, a malformed stream or a tensor view outside its storage is an error naming the
//! file; libtorch's own loader (`torch::jit::_load_parameters`, what tch binds) cannot read these files.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PthError {
    pub path: String,
    pub message: String,
}

// Every variant's payload is shown in error messages through Debug; the lint does not count that.
#[allow(dead_code)]
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name` of a GLOBAL: only ever compared, never imported.
    Global(String),
    Storage {
        key: String,
        kind: Kind,
        numel: i64,
    },
    Tensor {
        storage: Box<Value>,
        offset: i64,
        size: Vec<i64>,
        stride: Vec<i64>,
    },
    Mark,
}

type Res<T> = Result<T, String>;

/// Containers nest at most this deep (a state_dict needs 3–4): dropping or printing a deeper value
/// would recurse off the stack.
const MAX_DEPTH: usize = 32;
/// Values a pickle may make in all, one per opcode plus every value copied into or out of its memo:
/// a state_dict needs a few dozen per tensor, and neither a few GET opcodes nor a long run of APPENDs
/// may build gigabytes of values (each is ~72 bytes, so this bounds them to ~150 MB).
const VALUE_BUDGET: usize = 1 << 21;
/// `data.pkl` larger than this is refused unread: a state_dict of 100 000 tensors pickles to ~10 MB.
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// What the reader may allocate beyond four times the file's size (see [`read_state_dict`]).
const BUDGET_SLACK: u64 = 64 << 20;

fn children(v: &Value) -> Box<dyn Iterator<Item = &Value> + '_> {
    match v {
        Value::Tuple(items) | Value::List(items) => Box::new(items.iter()),
        Value::Dict(items) => Box::new(items.iter().flat_map(|(k, v)| [k, v])),
        Value::Tensor { storage, .. } => Box::new(std::iter::once(storage.as_ref())),
        _ => Box::new(std::iter::empty()),
    }
}

/// A value for an error message, cut short.
fn show(v: &Value) -> String {
    let mut s = format!("{v:?}");
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn depth(v: &Value) -> usize {
    1 + children(v).map(depth).max().unwrap_or(0)
}

fn nodes(v: &Value) -> usize {
    1 + children(v).map(nodes).sum::<usize>()
}

/// Storage class names as torch.save writes them → element kind.
fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name.strip_prefix("torch.")? {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

fn int(v: &Value) -> Res<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        other => Err(format!("expected an integer, got {}", show(other))),
    }
}

fn ints(v: &Value) -> Res<Vec<i64>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(int).collect(),
        other => Err(format!("expected a tuple of integers, got {}", show(other))),
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    /// Values made so far, against [`VALUE_BUDGET`].
    made: usize,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end =
            end.ok_or_else(|| format!("pickle ends inside an opcode at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Res<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL name")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(s.to_string())
    }

    fn text(&mut self, n: usize) -> Res<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(
            String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not UTF-8")?,
        ))
    }

    fn pop(&mut self) -> Res<Value> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    fn top(&mut self) -> Res<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".to_string())
    }

    /// Everything above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Res<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("no MARK on the pickle stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&mut self, key: u32) -> Res<()> {
        let v = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo {key} used before it is set"))?;
        self.made += nodes(v);
        if self.made > VALUE_BUDGET {
            return Err(
                "the pickle copies more values out of its memo than a state_dict does".into(),
            );
        }
        self.stack.push(v.clone());
        Ok(())
    }

    /// Pushes a value built from others, refusing nesting that recursion could not handle.
    fn push_built(&mut self, v: Value) -> Res<()> {
        if depth(&v) > MAX_DEPTH {
            return Err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn memo_put(&mut self, key: u32) -> Res<()> {
        let v = self.stack.last().ok_or("pickle stack underflow")?;
        self.made += nodes(v);
        if self.made > VALUE_BUDGET {
            return Err(
                "the pickle copies more values into its memo than a state_dict does".into(),
            );
        }
        let v = v.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Res<()> {
        if !items.len().is_multiple_of(2) {
            return Err("SETITEMS with an odd number of values".into());
        }
        if items.iter().any(|v| depth(v) >= MAX_DEPTH) {
            return Err(format!("containers nested deeper than {MAX_DEPTH}"));
        }
        let Value::Dict(d) = self.top()? else {
            return Err("SETITEMS on something that is not a dict".into());
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn reduce(callable: Value, args: Value) -> Res<Value> {
        let Value::Global(name) = callable else {
            return Err(format!("REDUCE of a non-global {}", show(&callable)));
        };
        let Value::Tuple(args) = args else {
            return Err(format!("REDUCE of {name} without an argument tuple"));
        };
        match name.as_str() {
            "collections.OrderedDict" if args.is_empty() => Ok(Value::Dict(vec![])),
            "torch._utils._rebuild_tensor_v2" if args.len() >= 4 => Ok(Value::Tensor {
                storage: Box::new(args[0].clone()),
                offset: int(&args[1])?,
                size: ints(&args[2])?,
                stride: ints(&args[3])?,
            }),
            "torch._utils._rebuild_parameter" if !args.is_empty() => Ok(args[0].clone()),
            _ => Err(format!(
                "the pickle calls {name}, which a state_dict of tensors does not need"
            )),
        }
    }

    fn persistent(pid: Value) -> Res<Value> {
        let Value::Tuple(p) = pid else {
            return Err("a persistent id that is not a tuple".into());
        };
        match &p[..] {
            [Value::Str(tag), Value::Global(class), Value::Str(key), _location, numel]
                if tag == "storage" =>
            {
                let kind = storage_kind(class)
                    .ok_or_else(|| format!("unsupported storage type {class}"))?;
                Ok(Value::Storage {
                    key: key.clone(),
                    kind,
                    numel: int(numel)?,
                })
            }
            other => Err(format!(
                "unsupported persistent id {}",
                show(&Value::Tuple(other.to_vec()))
            )),
        }
    }

    fn run(mut self) -> Res<Value> {
        loop {
            let op = self.u8()?;
            self.made += 1;
            if self.made > VALUE_BUDGET {
                return Err(format!(
                    "more than {VALUE_BUDGET} opcodes and values: larger than any state_dict's pickle"
                ));
            }
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n ≤ 8 bytes.
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("an integer of {n} bytes"));
                    }
                    let b = self.take(n)?;
                    let mut buf = [if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        0xff
                    } else {
                        0
                    }; 8];
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v);
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let v = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(v));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(format!("{module}.{name}")));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(format!("{m}.{n}")))
                        }
                        _ => return Err("STACK_GLOBAL of non-strings".into()),
                    }
                }
                b')' => self.stack.push(Value::Tuple(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_built(Value::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.iter().any(|v| matches!(v, Value::Mark)) {
                        return Err("a MARK inside a tuple".into());
                    }
                    self.push_built(Value::Tuple(items))?;
                }
                b']' => self.stack.push(Value::List(vec![])),
                b'}' => self.stack.push(Value::Dict(vec![])),
                b'a' => {
                    let v = self.pop()?;
                    if depth(&v) >= MAX_DEPTH {
                        return Err(format!("containers nested deeper than {MAX_DEPTH}"));
                    }
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("APPEND to something that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if items.iter().any(|v| depth(v) >= MAX_DEPTH) {
                        return Err(format!("containers nested deeper than {MAX_DEPTH}"));
                    }
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("APPENDS to something that is not a list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?;
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = Self::persistent(pid)?;
                    self.push_built(v)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = Self::reduce(callable, args)?;
                    self.push_built(v)?;
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (`_metadata`) changes no tensor.
                    self.pop()?;
                    if !matches!(self.top()?, Value::Dict(_)) {
                        return Err("BUILD of something that is not a dict".into());
                    }
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
            }
            if self.stack.len() > 1 << 20 || self.memo.len() > 1 << 22 {
                return Err("pickle too deep".into());
            }
        }
    }
}

/// Reads every tensor of a `torch.save`d state_dict (nested dicts flattened with `.`), on the CPU,
/// contiguous, in the dtypes the file stores.
///
/// Every size in the file is checked before anything of that size is allocated: with checked
/// arithmetic, against the bytes its zip entry holds, and against one budget for everything the reader
/// allocates (the pickle, each storage, each tensor cut from one) of four times the file's size plus
/// 64 MiB. A file can describe the data it holds and a few copies of it, never gigabytes from a few
/// bytes (a stride-0 view, a deflated storage, a storage that claims more elements than it has).
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, PthError> {
    let fail = |message: String| PthError {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| fail(format!("opening: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| fail(format!("reading its size: {e}")))?
        .len();
    let mut budget = file_len.saturating_mul(4).saturating_add(BUDGET_SLACK);
    let mut spend = |what: &str, bytes: u64| -> Result<(), PthError> {
        budget = budget.checked_sub(bytes).ok_or_else(|| {
            fail(format!(
                "{what} needs {bytes} bytes, beyond what a file of {file_len} bytes can describe \
                 (four times its size plus {} MiB, in all)",
                BUDGET_SLACK >> 20
            ))
        })?;
        Ok(())
    };
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        fail(format!(
            "not a torch.save zip archive ({e}); files from torch < 1.6 or torch.jit.save are not read"
        ))
    })?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_string)
        .ok_or_else(|| fail("no <dir>/data.pkl entry: not a torch.save archive".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    // Exactly `len` bytes of an entry. The entry's size record is a claim like any other: the buffer
    // grows only as bytes arrive, and inflation stops at `len`.
    let read_entry =
        |zip: &mut zip::ZipArchive<_>, name: &str, len: u64| -> Result<Vec<u8>, PthError> {
            let entry = zip
                .by_name(name)
                .map_err(|e| fail(format!("entry {name}: {e}")))?;
            if entry.size() != len {
                return Err(fail(format!(
                    "entry {name} holds {} bytes, {len} expected",
                    entry.size()
                )));
            }
            let mut buf = Vec::with_capacity(len.min(1 << 24) as usize);
            entry
                .take(len)
                .read_to_end(&mut buf)
                .map_err(|e| fail(format!("reading entry {name}: {e}")))?;
            if buf.len() as u64 != len {
                return Err(fail(format!(
                    "entry {name} ends after {} of its {len} bytes",
                    buf.len()
                )));
            }
            Ok(buf)
        };
    let entry_size = |zip: &mut zip::ZipArchive<_>, name: &str| -> Result<u64, PthError> {
        zip.by_name(name)
            .map(|e| e.size())
            .map_err(|e| fail(format!("entry {name}: {e}")))
    };
    let order_name = format!("{prefix}byteorder");
    if let Ok(len) = entry_size(&mut zip, &order_name) {
        let order = read_entry(&mut zip, &order_name, len.min(16))?;
        if order != b"little" {
            return Err(fail(format!(
                "byte order {:?}: only little-endian files are read",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pickle_len = entry_size(&mut zip, &pkl_name)?;
    if pickle_len > MAX_PICKLE_BYTES {
        return Err(fail(format!(
            "{pkl_name} holds {pickle_len} bytes; a state_dict's pickle is at most {} MiB",
            MAX_PICKLE_BYTES >> 20
        )));
    }
    spend(&pkl_name, pickle_len)?;
    let pickle = read_entry(&mut zip, &pkl_name, pickle_len)?;
    let root = Machine {
        data: &pickle,
        pos: 0,
        stack: vec![],
        memo: HashMap::new(),
        made: 0,
    }
    .run()
    .map_err(|e| fail(format!("{pkl_name}: {e}")))?;
    let mut flat = vec![];
    flatten("", root, &mut flat).map_err(fail)?;
    let mut out = Vec::with_capacity(flat.len());
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    for (name, v) in flat {
        let Value::Tensor {
            storage,
            offset,
            size,
            stride,
        } = v
        else {
            continue;
        };
        let Value::Storage { key, kind, numel } = *storage else {
            return Err(fail(format!("`{name}`: a tensor without a storage")));
        };
        if numel < 0 || size.iter().chain(&stride).any(|&x| x < 0) || offset < 0 {
            return Err(fail(format!("`{name}`: negative size, stride or offset")));
        }
        if size.len() != stride.len() {
            return Err(fail(format!(
                "`{name}`: {} sizes, {} strides",
                size.len(),
                stride.len()
            )));
        }
        // The view must lie inside its storage before libtorch sees it.
        let last = size.iter().zip(&stride).try_fold(offset, |acc, (&n, &s)| {
            if n == 0 {
                Some(acc)
            } else {
                acc.checked_add((n - 1).checked_mul(s)?)
            }
        });
        let empty = size.contains(&0);
        if !empty && last.is_none_or(|l| l >= numel) {
            return Err(fail(format!(
                "`{name}`: view (offset {offset}, size {size:?}, stride {stride:?}) outside its storage of {numel} elements"
            )));
        }
        let elt = kind.elt_size_in_bytes() as u64;
        // Overlapping strides (stride 0) make a view larger than its storage, and the contiguous copy
        // is what is allocated: its size is checked like any other.
        let view_bytes = size
            .iter()
            .try_fold(elt, |acc, &n| acc.checked_mul(n as u64))
            .ok_or_else(|| fail(format!("`{name}`: size {size:?} overflows")))?;
        let base = match storages.get(&key) {
            Some(t) if t.kind() == kind && t.numel() as i64 == numel => t.shallow_clone(),
            Some(_) => {
                return Err(fail(format!(
                    "storage {key} is used with two types or sizes"
                )))
            }
            None => {
                let entry = format!("{prefix}data/{key}");
                let bytes = (numel as u64).checked_mul(elt).ok_or_else(|| {
                    fail(format!(
                        "storage {key} of `{name}`: {numel} elements of {kind:?} overflow"
                    ))
                })?;
                let held = entry_size(&mut zip, &entry)?;
                if held != bytes {
                    return Err(fail(format!(
                        "storage {key} of `{name}` has {held} bytes, {numel} elements of {kind:?} need {bytes}"
                    )));
                }
                spend(&format!("storage {key} of `{name}`"), bytes)?;
                let data = read_entry(&mut zip, &entry, bytes)?;
                let t = Tensor::f_from_data_size(&data, &[numel], kind)
                    .map_err(|e| fail(format!("storage {key}: {e}")))?;
                storages.insert(key.clone(), t.shallow_clone());
                t
            }
        };
        spend(
            &format!("`{name}` (size {size:?}, stride {stride:?})"),
            view_bytes,
        )?;
        let t = if empty {
            Tensor::f_zeros(&size, (kind, tch::Device::Cpu))
        } else {
            base.f_as_strided(&size, &stride, offset)
                .and_then(|t| t.f_contiguous())
        }
        .map_err(|e| fail(format!("`{name}`: {e}")))?;
        out.push((name, t));
    }
    if out.is_empty() {
        return Err(fail("the state_dict holds no tensors".into()));
    }
    Ok(out)
}

/// Dict entries as `prefix.key` → value; a checkpoint that wraps the state_dict in another dict (e.g.
/// `{"model": …}`) comes out with that prefix, which the caller may strip.
fn flatten(prefix: &str, v: Value, out: &mut Vec<(String, Value)>) -> Result<(), String> {
    match v {
        Value::Dict(items) => {
            for (k, v) in items {
                let key = match k {
                    Value::Str(s) => s,
                    Value::Int(i) => i.to_string(),
                    other => return Err(format!("a dict key {}", show(&other))),
                };
                let name = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, v, out)?;
            }
            Ok(())
        }
        other => {
            out.push((prefix.to_string(), other));
            Ok(())
        }
    }
}
